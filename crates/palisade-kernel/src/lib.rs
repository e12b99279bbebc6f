//! Palisade's kernel-side defense against SYN floods:
//!
//! * [`procnet`]: the kernel's TCP counters (`/proc/net/netstat`,
//!   `/proc/net/snmp`) and half-open connections (`/proc/net/tcp{,6}`),
//!   parsed by pure functions tested on fixtures;
//! * [`capture`]: per-source SYN counting from an `AF_PACKET` socket with
//!   a BPF filter, and the sliding rates that flag offenders;
//! * [`diag`]: half-open connections from `NETLINK_SOCK_DIAG`, filtered by
//!   state in the kernel (the `/proc/net/tcp` parser stays as the fallback);
//! * [`cookie`]: a SYN-cookie function (keyed hash of the connection and a
//!   time slot, with the MSS encoded), for a SYN-cookie responder;
//! * [`firewall`]: bans in the kernel through nftables (one batch per
//!   change, never a shell string), iptables + ipset, or a dry run;
//! * [`netns`]: network namespaces for tests and tools;
//! * [`xdp`]: the XDP program (C, compiled by clang from `build.rs`) that
//!   drops banned sources in the driver hook and counts SYNs per source.

pub mod capture;
pub mod cookie;
pub mod diag;
pub mod firewall;
pub mod netns;
pub mod procnet;
pub mod xdp;
