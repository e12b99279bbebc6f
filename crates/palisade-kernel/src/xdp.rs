//! The XDP layer: banned sources are dropped by the driver hook
//! before the kernel allocates a socket buffer for them, and SYNs are
//! counted per source in a kernel map.
//!
//! The program (`bpf/palisade.bpf.c`) is compiled by clang from `build.rs`
//! and embedded; this module loads it with aya, attaches it to interfaces,
//! and drives its maps: `ban4`/`ban6` (LPM tries, so CIDR and IPv6 /64 bans
//! work), `syns` (per-CPU LRU hash of SYNs per source), `stats` (packets
//! seen, dropped, SYNs).

use std::net::{IpAddr, Ipv6Addr};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::Xdp;
/// How the program is attached (re-exported from aya).
pub use aya::programs::XdpMode;
use ipnet::IpNet;

/// The compiled program; empty when clang was missing at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade.bpf.o"));

/// XDP failed.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// Built without clang: no program to load.
    #[error("this build has no XDP program (clang and libbpf-dev were missing when it was compiled)")]
    NotBuilt,
    /// Loading, verifying or attaching failed.
    #[error("{0}")]
    Ebpf(String),
}

fn err(e: impl std::fmt::Display) -> XdpError {
    XdpError::Ebpf(e.to_string())
}

/// Counters of the XDP program, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct XdpStats {
    /// Packets seen.
    pub seen: u64,
    /// Packets dropped because their source is banned.
    pub dropped: u64,
    /// TCP SYNs seen (not banned).
    pub syns: u64,
}

/// Handshake state of one source, as the XDP program tracks it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[repr(C)]
pub struct SourceStats {
    /// SYNs whose handshake the client never completed (no ACK seen).
    pub half_open: i64,
    /// SYNs sent again (same source port and sequence number).
    pub retrans: u64,
}

// SAFETY: two plain integers, no padding; any bit pattern is valid.
unsafe impl aya::Pod for SourceStats {}

/// The loaded and attached program. Dropping it detaches it.
pub struct XdpDefense {
    ebpf: aya::Ebpf,
    interfaces: Vec<String>,
}

impl std::fmt::Debug for XdpDefense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpDefense")
            .field("interfaces", &self.interfaces)
            .finish_non_exhaustive()
    }
}

/// The per-source key: IPv6, with IPv4 as `::ffff:a.b.c.d`.
fn source_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

impl XdpDefense {
    /// Whether this build carries the program.
    pub fn built() -> bool {
        !OBJECT.is_empty()
    }

    /// Loads the program and attaches it to every interface (generic
    /// `Skb` mode works everywhere; `Default` lets the driver choose).
    ///
    /// Bans drop only TCP to `ports` (at most 64): a banned address's other
    /// traffic, its answers to the host's own connections included, passes.
    pub fn attach(interfaces: &[&str], mode: XdpMode, ports: &[u16]) -> Result<Self, XdpError> {
        if !Self::built() {
            return Err(XdpError::NotBuilt);
        }
        let mut ebpf = aya::Ebpf::load(OBJECT).map_err(err)?;
        {
            let mut map: aya::maps::HashMap<&mut MapData, u16, u8> =
                aya::maps::HashMap::try_from(ebpf.map_mut("ports").ok_or_else(|| err("no ports map"))?)
                    .map_err(err)?;
            for port in ports {
                // The program compares with the header's bytes as they are.
                map.insert(u16::from_ne_bytes(port.to_be_bytes()), 1, 0)
                    .map_err(err)?;
            }
        }
        let prog: &mut Xdp = ebpf
            .program_mut("palisade_xdp")
            .ok_or_else(|| err("program palisade_xdp missing from the object"))?
            .try_into()
            .map_err(err)?;
        prog.load().map_err(err)?;
        for i in interfaces {
            prog.attach(i, mode)
                .map_err(|e| err(format!("attaching to {i}: {e}")))?;
        }
        Ok(Self {
            ebpf,
            interfaces: interfaces.iter().map(|s| (*s).to_owned()).collect(),
        })
    }

    /// Interfaces it is attached to.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// Drops everything from `net` from now on.
    pub fn ban(&mut self, net: IpNet) -> Result<(), XdpError> {
        let net = net.trunc();
        match net {
            IpNet::V4(n) => {
                let mut map: LpmTrie<&mut MapData, [u8; 4], u32> =
                    LpmTrie::try_from(self.ebpf.map_mut("ban4").ok_or_else(|| err("no ban4 map"))?)
                        .map_err(err)?;
                map.insert(&Key::new(u32::from(n.prefix_len()), n.network().octets()), 1, 0)
                    .map_err(err)
            }
            IpNet::V6(n) => {
                let mut map: LpmTrie<&mut MapData, [u8; 16], u32> =
                    LpmTrie::try_from(self.ebpf.map_mut("ban6").ok_or_else(|| err("no ban6 map"))?)
                        .map_err(err)?;
                map.insert(&Key::new(u32::from(n.prefix_len()), n.network().octets()), 1, 0)
                    .map_err(err)
            }
        }
    }

    /// Lifts a ban (exact prefix); absent ones are ignored.
    pub fn unban(&mut self, net: IpNet) -> Result<(), XdpError> {
        let net = net.trunc();
        let result = match net {
            IpNet::V4(n) => {
                let mut map: LpmTrie<&mut MapData, [u8; 4], u32> =
                    LpmTrie::try_from(self.ebpf.map_mut("ban4").ok_or_else(|| err("no ban4 map"))?)
                        .map_err(err)?;
                map.remove(&Key::new(u32::from(n.prefix_len()), n.network().octets()))
            }
            IpNet::V6(n) => {
                let mut map: LpmTrie<&mut MapData, [u8; 16], u32> =
                    LpmTrie::try_from(self.ebpf.map_mut("ban6").ok_or_else(|| err("no ban6 map"))?)
                        .map_err(err)?;
                map.remove(&Key::new(u32::from(n.prefix_len()), n.network().octets()))
            }
        };
        match result {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// The program's counters.
    pub fn stats(&mut self) -> Result<XdpStats, XdpError> {
        let map: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map_mut("stats").ok_or_else(|| err("no stats map"))?)
                .map_err(err)?;
        let sum = |i: u32| map.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
        Ok(XdpStats {
            seen: sum(0),
            dropped: sum(1),
            syns: sum(2),
        })
    }

    /// SYNs counted per source since the last [`Self::clear_syns`].
    pub fn syns_by_source(&mut self) -> Result<Vec<(IpAddr, u64)>, XdpError> {
        let map: PerCpuHashMap<&mut MapData, [u8; 16], u64> =
            PerCpuHashMap::try_from(self.ebpf.map_mut("syns").ok_or_else(|| err("no syns map"))?)
                .map_err(err)?;
        let mut out: Vec<(IpAddr, u64)> = map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv6Addr::from(k).to_canonical(), v.iter().sum::<u64>()))
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.1));
        Ok(out)
    }

    /// Half-open and retransmitted SYNs per source (sources seen recently;
    /// the map is an LRU of 65 536).
    pub fn sources(&mut self) -> Result<Vec<(IpAddr, SourceStats)>, XdpError> {
        let map: BpfHashMap<&mut MapData, [u8; 16], SourceStats> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("sources")
                .ok_or_else(|| err("no sources map"))?,
        )
        .map_err(err)?;
        Ok(map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv6Addr::from(k).to_canonical(), v))
            .collect())
    }

    /// Forgets one source's SYN count (after judging it).
    pub fn clear_syns(&mut self, ip: IpAddr) -> Result<(), XdpError> {
        let mut map: PerCpuHashMap<&mut MapData, [u8; 16], u64> =
            PerCpuHashMap::try_from(self.ebpf.map_mut("syns").ok_or_else(|| err("no syns map"))?)
                .map_err(err)?;
        match map.remove(&source_key(ip)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}

/// The interfaces that carry `addr`: for an unspecified address (0.0.0.0,
/// ::) every interface that is up and not loopback.
pub fn interfaces_for(addr: IpAddr) -> std::io::Result<Vec<String>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut names = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated interface name.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        let loopback = ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
        let matches = if addr.is_unspecified() {
            up && !loopback
        } else {
            // SAFETY: ifa_addr, when set, points at a sockaddr of its family.
            unsafe { sockaddr_ip(ifa.ifa_addr) }.is_some_and(|a| a == addr.to_canonical())
        };
        if matches && !names.contains(&name) {
            names.push(name);
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(names)
}

/// # Safety
/// `sa` is null or points at a valid sockaddr.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller's contract; the family says which struct it is.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*sa.cast::<libc::sockaddr_in>();
                Some(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()))
            }
            libc::AF_INET6 => {
                let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                Some(IpAddr::from(sin6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}
