//! Packets per second a server namespace absorbs from one flooding source
//! when it is dropped by XDP, by nftables, or not at all (the kernel answers
//! each SYN with a RST). Run by `scripts/bench --xdp` as root:
//!
//! ```sh
//! cargo run --release -p palisade-kernel --example xdp_bench -- [seconds]
//! ```
//!
//! Two namespaces joined by a veth pair (198.18.5.0/24), created here and
//! deleted at the end; hping3 floods from the attacker side for a bounded
//! time and packet count. On a veth pair the receiving side's work runs in
//! the sender's context, so the rate hping3 reaches is the rate the server
//! side can absorb with each defense.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::process::Command;
use std::time::Duration;

use palisade_kernel::firewall::{Firewall, Nftables};
use palisade_kernel::netns::Netns;
use palisade_kernel::xdp::{XdpDefense, XdpMode};

/// Packets hping3 got out in `seconds` (it prints them when interrupted).
fn flood(att: &Netns, seconds: u64) -> f64 {
    let out = Command::new("timeout")
        .args([
            "-s",
            "INT",
            &seconds.to_string(),
            "ip",
            "netns",
            "exec",
            att.name(),
        ])
        .args([
            "hping3",
            "--flood",
            "-S",
            "-p",
            "9",
            "-c",
            "50000000",
            "198.18.5.1",
        ])
        .output()
        .expect("hping3 and coreutils' timeout are needed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: f64 = text
        .split("packets transmitted")
        .next()
        .and_then(|head| head.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no hping3 statistics in: {text}"));
    sent / seconds as f64
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

    let none = flood(&att, seconds);

    let nft = Nftables::new(Duration::from_secs(600)).in_netns(srv.name());
    nft.setup().unwrap();
    nft.ban(&[("198.18.5.2/32".parse().unwrap(), Duration::from_secs(600))])
        .unwrap();
    let nftables = flood(&att, seconds);
    nft.teardown().unwrap();

    let xdp = if XdpDefense::built() {
        let mut x = srv
            .enter(|| XdpDefense::attach(&["v0"], XdpMode::Default))
            .join()
            .unwrap()
            .unwrap();
        x.ban("198.18.5.2/32".parse().unwrap()).unwrap();
        let pps = flood(&att, seconds);
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
