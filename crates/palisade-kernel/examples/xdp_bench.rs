//! Packets per second a server namespace absorbs from one flooding source
//! when it is dropped by XDP, by nftables, or not at all (the kernel answers
//! each SYN with a RST). Run by `scripts/bench --xdp` as root:
//!
//! ```sh
//! cargo run --release -p palisade-kernel --example xdp_bench -- [seconds]
//! ```
//!
//! Two namespaces joined by a veth pair (198.18.5.0/24), created here and
//! deleted at the end; a raw packet socket on the attacker side sends SYNs
//! with valid checksums (64 per `sendmmsg`, qdisc bypassed) for a bounded
//! time and packet count. On a veth pair the receiving side's work runs in
//! the sender's softirq, so the rate reached is the rate the server side
//! absorbs with each defense. Caveat: on veth the packet is already an skb
//! when XDP sees it, so XDP cannot save the allocation it saves on a
//! physical NIC.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

use std::time::Duration;

use palisade_kernel::firewall::{Firewall, Nftables};
use palisade_kernel::netns::Netns;
use palisade_kernel::xdp::{XdpDefense, XdpMode};

/// A SYN from 198.18.5.2 to 198.18.5.1:9 as an Ethernet frame, with valid
/// IP and TCP checksums (so the no-defense path does the full work).
fn syn_frame(dst_mac: [u8; 6], src_mac: [u8; 6], sport: u16) -> Vec<u8> {
    fn sum(data: &[u8], mut acc: u32) -> u32 {
        for c in data.chunks(2) {
            acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        acc
    }
    fn fold(mut acc: u32) -> u16 {
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }
    let (src, dst) = ([198, 18, 5, 2], [198, 18, 5, 1]);
    let mut f = Vec::with_capacity(54);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = fold(sum(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&9u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let c = fold(sum(&tcp, sum(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&tcp);
    f
}

fn mac(ns: &Netns, dev: &str) -> [u8; 6] {
    let out = ns
        .exec(&["cat", &format!("/sys/class/net/{dev}/address")])
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut m = [0u8; 6];
    for (i, h) in text.trim().split(':').enumerate() {
        m[i] = u8::from_str_radix(h, 16).unwrap();
    }
    m
}

/// SYNs per second a raw packet socket on the attacker's veth gets out in
/// `seconds` (bounded by time and by 200 M packets). On a veth pair the
/// receiving side's work runs in the sender's softirq, so this is the rate
/// the server side absorbs.
fn flood(att: &Netns, srv: &Netns, seconds: u64) -> f64 {
    let (dst, src) = (mac(srv, "v0"), mac(att, "v1"));
    att.enter(move || {
        // SAFETY: plain socket syscalls on a descriptor this closure owns;
        // `ll` is a fully initialised sockaddr_ll for the veth.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            let mut ll: libc::sockaddr_ll = std::mem::zeroed();
            ll.sll_family = libc::AF_PACKET as u16;
            ll.sll_protocol = 0x0800u16.to_be();
            ll.sll_ifindex = libc::if_nametoindex(c"v1".as_ptr()) as i32;
            ll.sll_halen = 6;
            ll.sll_addr[..6].copy_from_slice(&dst);
            // Skip the qdisc and send 64 frames per syscall: the sender
            // must cost less than the receiver for the receiver to show.
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                20, /* PACKET_QDISC_BYPASS */
                (&raw const one).cast(),
                4,
            );
            let mut frames: Vec<Vec<u8>> = (0..64u16).map(|i| syn_frame(dst, src, 20_000 + i)).collect();
            let mut iov: Vec<libc::iovec> = frames
                .iter_mut()
                .map(|f| libc::iovec {
                    iov_base: f.as_mut_ptr().cast(),
                    iov_len: f.len(),
                })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = iov
                .iter_mut()
                .map(|v| {
                    let mut m: libc::mmsghdr = std::mem::zeroed();
                    m.msg_hdr.msg_name = (&raw mut ll).cast();
                    m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                    m.msg_hdr.msg_iov = v;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
            let mut sent = 0u64;
            while std::time::Instant::now() < deadline && sent < 200_000_000 {
                let n = libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, 0);
                if n > 0 {
                    sent += n as u64;
                }
            }
            libc::close(fd);
            sent as f64 / seconds as f64
        }
    })
    .join()
    .unwrap()
}

fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let (Some(srv), Some(att)) = (Netns::create("bsrv"), Netns::create("batt")) else {
        eprintln!("xdp_bench: needs root (network namespaces)");
        std::process::exit(2);
    };
    srv.link(&att, "198.18.5.1/24", &["198.18.5.2/24"]).unwrap();
    // Warm the neighbour tables so the first flood is not an ARP test.
    let _ = att.exec(&[
        "ip",
        "neigh",
        "add",
        "198.18.5.1",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "v1",
    ]);
    let _ = srv.run(&["ip", "link", "set", "v0", "address", "02:00:00:00:00:01"]);

    let none = flood(&att, &srv, seconds);

    let nft = Nftables::new(Duration::from_secs(600), &[9]).in_netns(srv.name());
    nft.setup().unwrap();
    nft.ban(&[("198.18.5.2/32".parse().unwrap(), Duration::from_secs(600))])
        .unwrap();
    let nftables = flood(&att, &srv, seconds);
    nft.teardown().unwrap();

    let xdp = if XdpDefense::built() {
        let mut x = srv
            .enter(|| XdpDefense::attach(&["v0"], XdpMode::Default, &[9]))
            .join()
            .unwrap()
            .unwrap();
        x.ban("198.18.5.2/32".parse().unwrap()).unwrap();
        let pps = flood(&att, &srv, seconds);
        let dropped = x.stats().unwrap().dropped;
        drop(x);
        eprintln!("xdp dropped {dropped} packets");
        Some(pps)
    } else {
        None
    };
    println!("flood absorbed by the server namespace, {seconds} s each, one source (packets/s):");
    println!("  no defense (kernel RSTs each SYN)  {none:>12.0}");
    println!(
        "  nftables drop (prerouting -300)    {nftables:>12.0}   {:.2}x no defense",
        nftables / none
    );
    match xdp {
        Some(x) => println!(
            "  XDP drop                           {x:>12.0}   {:.2}x no defense, {:.2}x nftables",
            x / none,
            x / nftables
        ),
        None => println!("  XDP drop                           (built without clang)"),
    }
}
