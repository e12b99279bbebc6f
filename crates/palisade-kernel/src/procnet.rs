//! The kernel's view of TCP: counters and half-open connections.
//!
//! Everything here is a pure function of the file's text, so it is tested
//! on fixtures captured from a real kernel; the callers read the files.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A malformed `/proc` file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub why: String,
}

/// Parses the "header line, value line" pairs of `/proc/net/netstat` and
/// `/proc/net/snmp` into `Section.Name → value`.
pub fn parse_counters(text: &str) -> Result<BTreeMap<String, i64>, ParseError> {
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if !lines.len().is_multiple_of(2) {
        return Err(ParseError {
            line: lines.len(),
            why: "a header line without its value line".into(),
        });
    }
    for (i, pair) in lines.chunks(2).enumerate() {
        let line = 2 * i + 1;
        let split = |l: &str| -> Result<(String, Vec<String>), ParseError> {
            let (section, rest) = l.split_once(':').ok_or_else(|| ParseError {
                line,
                why: format!("no section name in {l:?}"),
            })?;
            Ok((
                section.trim().to_owned(),
                rest.split_whitespace().map(str::to_owned).collect(),
            ))
        };
        let (section, names) = split(pair[0])?;
        let (section2, values) = split(pair[1])?;
        if section != section2 || names.len() != values.len() {
            return Err(ParseError {
                line: line + 1,
                why: format!(
                    "{section}: {} names but {section2}: {} values",
                    names.len(),
                    values.len()
                ),
            });
        }
        for (name, value) in names.iter().zip(&values) {
            let v = value.parse::<i64>().map_err(|_| ParseError {
                line: line + 1,
                why: format!("{section}.{name}: {value:?} is not a number"),
            })?;
            out.insert(format!("{section}.{name}"), v);
        }
    }
    Ok(out)
}

/// The counters SYN-flood detection watches. Monotonic since boot; a
/// missing counter (older kernels) reads 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TcpCounters {
    /// SYN cookies sent (the kernel's SYN queue was full).
    pub syncookies_sent: u64,
    /// Valid SYN cookies received back.
    pub syncookies_recv: u64,
    /// Invalid SYN cookies received.
    pub syncookies_failed: u64,
    /// Times a listen queue overflowed.
    pub listen_overflows: u64,
    /// SYNs dropped at a listener.
    pub listen_drops: u64,
    /// SYN queue full, cookies sent instead.
    pub req_q_full_do_cookies: u64,
    /// SYN queue full, syncookies off: the SYN was dropped.
    pub req_q_full_drop: u64,
    /// SYN-ACKs retransmitted (the client never answered).
    pub syn_retrans: u64,
    /// Connections accepted (passive opens).
    pub passive_opens: u64,
    /// Segments sent.
    pub out_segs: u64,
    /// Segments retransmitted.
    pub retrans_segs: u64,
}

impl TcpCounters {
    /// Picks the counters out of parsed netstat and snmp maps.
    pub fn from_maps(netstat: &BTreeMap<String, i64>, snmp: &BTreeMap<String, i64>) -> Self {
        let get = |m: &BTreeMap<String, i64>, k: &str| m.get(k).copied().unwrap_or(0).max(0) as u64;
        Self {
            syncookies_sent: get(netstat, "TcpExt.SyncookiesSent"),
            syncookies_recv: get(netstat, "TcpExt.SyncookiesRecv"),
            syncookies_failed: get(netstat, "TcpExt.SyncookiesFailed"),
            listen_overflows: get(netstat, "TcpExt.ListenOverflows"),
            listen_drops: get(netstat, "TcpExt.ListenDrops"),
            req_q_full_do_cookies: get(netstat, "TcpExt.TCPReqQFullDoCookies"),
            req_q_full_drop: get(netstat, "TcpExt.TCPReqQFullDrop"),
            syn_retrans: get(netstat, "TcpExt.TCPSynRetrans"),
            passive_opens: get(snmp, "Tcp.PassiveOpens"),
            out_segs: get(snmp, "Tcp.OutSegs"),
            retrans_segs: get(snmp, "Tcp.RetransSegs"),
        }
    }

    /// Reads the current counters of this network namespace.
    pub fn read() -> std::io::Result<Self> {
        let netstat = std::fs::read_to_string("/proc/net/netstat")?;
        let snmp = std::fs::read_to_string("/proc/net/snmp")?;
        let bad = |e: ParseError| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
        Ok(Self::from_maps(
            &parse_counters(&netstat).map_err(bad)?,
            &parse_counters(&snmp).map_err(bad)?,
        ))
    }

    /// What happened between `earlier` and `self` (counters that went
    /// backwards, e.g. after a namespace change, read as 0).
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            syncookies_sent: self.syncookies_sent.saturating_sub(earlier.syncookies_sent),
            syncookies_recv: self.syncookies_recv.saturating_sub(earlier.syncookies_recv),
            syncookies_failed: self.syncookies_failed.saturating_sub(earlier.syncookies_failed),
            listen_overflows: self.listen_overflows.saturating_sub(earlier.listen_overflows),
            listen_drops: self.listen_drops.saturating_sub(earlier.listen_drops),
            req_q_full_do_cookies: self
                .req_q_full_do_cookies
                .saturating_sub(earlier.req_q_full_do_cookies),
            req_q_full_drop: self.req_q_full_drop.saturating_sub(earlier.req_q_full_drop),
            syn_retrans: self.syn_retrans.saturating_sub(earlier.syn_retrans),
            passive_opens: self.passive_opens.saturating_sub(earlier.passive_opens),
            out_segs: self.out_segs.saturating_sub(earlier.out_segs),
            retrans_segs: self.retrans_segs.saturating_sub(earlier.retrans_segs),
        }
    }
}

/// TCP states in `/proc/net/tcp`.
const SYN_RECV: u8 = 0x03;
const LISTEN: u8 = 0x0A;

/// One row of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Socket {
    /// Local address.
    pub local: (IpAddr, u16),
    /// Remote address.
    pub remote: (IpAddr, u16),
    /// Kernel TCP state (`0x03` SYN-RECV, `0x0A` LISTEN, ...).
    pub state: u8,
}

impl Socket {
    /// A half-open connection (SYN received, handshake not finished).
    pub fn is_syn_recv(&self) -> bool {
        self.state == SYN_RECV
    }

    /// A listening socket.
    pub fn is_listen(&self) -> bool {
        self.state == LISTEN
    }
}

/// Parses `/proc/net/tcp` or `/proc/net/tcp6` (addresses are hex words in
/// host byte order, which is little-endian on every platform we run on).
pub fn parse_tcp_table(text: &str) -> Result<Vec<Socket>, ParseError> {
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate().skip(1) {
        if l.trim().is_empty() {
            continue;
        }
        let err = |why: &str| ParseError {
            line: i + 1,
            why: why.to_owned(),
        };
        let mut f = l.split_whitespace().skip(1);
        let local = endpoint(f.next().ok_or_else(|| err("no local address"))?)
            .ok_or_else(|| err("bad local address"))?;
        let remote = endpoint(f.next().ok_or_else(|| err("no remote address"))?)
            .ok_or_else(|| err("bad remote address"))?;
        let state =
            u8::from_str_radix(f.next().ok_or_else(|| err("no state"))?, 16).map_err(|_| err("bad state"))?;
        out.push(Socket { local, remote, state });
    }
    Ok(out)
}

fn endpoint(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(addr.get(8 * i..8 * i + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let ip = match words.as_slice() {
        [w] => IpAddr::V4(Ipv4Addr::from(w.swap_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port))
}

/// Half-open connections to `ports`, in total and per source address.
pub fn half_open(sockets: &[Socket], ports: &[u16]) -> (usize, BTreeMap<IpAddr, usize>) {
    let mut per_source = BTreeMap::new();
    let mut total = 0;
    for s in sockets
        .iter()
        .filter(|s| s.is_syn_recv() && ports.contains(&s.local.1))
    {
        total += 1;
        *per_source.entry(s.remote.0.to_canonical()).or_insert(0) += 1;
    }
    (total, per_source)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETSTAT: &str = include_str!("../tests/fixtures/netstat.txt");
    const SNMP: &str = include_str!("../tests/fixtures/snmp.txt");

    #[test]
    fn real_kernel_files_parse() {
        let netstat = parse_counters(NETSTAT).unwrap();
        let snmp = parse_counters(SNMP).unwrap();
        assert!(netstat.contains_key("TcpExt.SyncookiesSent"));
        assert!(netstat.contains_key("TcpExt.TCPSynRetrans"));
        assert!(snmp.contains_key("Tcp.PassiveOpens"));
        // Tcp.MaxConn is -1 on Linux: negative values parse.
        assert_eq!(snmp.get("Tcp.MaxConn"), Some(&-1));
        let c = TcpCounters::from_maps(&netstat, &snmp);
        assert_eq!(c.syncookies_sent, netstat["TcpExt.SyncookiesSent"] as u64);
        assert_eq!(c.passive_opens, snmp["Tcp.PassiveOpens"] as u64);
    }

    #[test]
    fn malformed_counters_name_the_line() {
        let e = parse_counters("TcpExt: A B\nTcpExt: 1\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse_counters("TcpExt: A\nTcpExt: x\n").unwrap_err();
        assert!(e.why.contains("TcpExt.A"), "{e}");
        assert!(parse_counters("TcpExt: A\n").is_err());
        assert!(parse_counters("TcpExt: A\nIpExt: 1\n").is_err());
    }

    #[test]
    fn deltas_never_go_negative() {
        let a = TcpCounters {
            syn_retrans: 10,
            ..Default::default()
        };
        let b = TcpCounters {
            syn_retrans: 4,
            passive_opens: 3,
            ..Default::default()
        };
        assert_eq!(b.since(&a).syn_retrans, 0);
        assert_eq!(b.since(&a).passive_opens, 3);
    }

    #[test]
    fn tcp_tables_give_half_open_per_source() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1170 1 0 100 0 0 10 0
   1: 010012C6:1F90 020012C6:C350 03 00000000:00000000 01:00000054 00000002     0        0 0 1 0
   2: 010012C6:1F90 020012C6:C351 03 00000000:00000000 01:00000054 00000002     0        0 0 1 0
   3: 010012C6:1F90 030012C6:C352 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0
   4: 010012C6:0050 020012C6:C353 03 00000000:00000000 01:00000054 00000002     0        0 0 1 0
";
        let sockets = parse_tcp_table(v4).unwrap();
        assert_eq!(sockets.len(), 5);
        assert!(sockets[0].is_listen());
        assert_eq!(sockets[1].local, ("198.18.0.1".parse().unwrap(), 8080));
        assert_eq!(sockets[1].remote, ("198.18.0.2".parse().unwrap(), 50000));
        let (total, per) = half_open(&sockets, &[8080]);
        assert_eq!(total, 2);
        assert_eq!(per.get(&"198.18.0.2".parse::<IpAddr>().unwrap()), Some(&2));
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0
";
        let s6 = parse_tcp_table(v6).unwrap();
        assert_eq!(s6[0].local, ("::1".parse().unwrap(), 8080));
        assert!(parse_tcp_table("header\n 0: zz:1 00:0 03\n").is_err());
    }

    #[test]
    fn this_machine_reads() {
        // Whatever the counters are, they read and parse.
        TcpCounters::read().unwrap();
        parse_tcp_table(&std::fs::read_to_string("/proc/net/tcp").unwrap()).unwrap();
    }
}
