//! Bans in a real kernel: two network namespaces joined by a veth pair
//! (addresses in 198.18.0.0/15), created here and always deleted. The
//! server namespace gets the firewall; pings from a banned and a clean
//! source address on the attacker side show what the kernel drops.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use palisade_kernel::firewall::{DryRun, Firewall, Iptables, Nftables};
use palisade_kernel::netns::Netns;

/// Server 198.18.0.1; attacker side 198.18.0.2 (to be banned) and
/// 198.18.0.3 (clean).
/// TCP listeners on 198.18.0.1:7000 (the protected port) and :7001 (a
/// port the firewall does not protect) accept until the namespace goes away.
fn pair() -> Option<(Netns, Netns)> {
    let srv = Netns::for_test("srv")?;
    let att = Netns::for_test("att")?;
    srv.link(&att, "198.18.0.1/24", &["198.18.0.2/24", "198.18.0.3/24"])
        .unwrap();
    for port in [PROTECTED, 7001] {
        let listener = srv
            .enter(move || TcpListener::bind(("198.18.0.1", port)).unwrap())
            .join()
            .unwrap();
        std::thread::spawn(move || for _ in listener.incoming() {});
    }
    Some((srv, att))
}

const PROTECTED: u16 = 7000;

/// Whether a TCP handshake from `from` to the protected port completes.
fn reaches(att: &Netns, from: &str) -> bool {
    reaches_port(att, from, PROTECTED)
}

fn reaches_port(att: &Netns, from: &str, port: u16) -> bool {
    let from: SocketAddr = format!("{from}:0").parse().unwrap();
    att.enter(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&from.into()).unwrap();
        let to = SocketAddr::from(([198, 18, 0, 1], port));
        s.connect_timeout(&to.into(), Duration::from_millis(500)).is_ok()
    })
    .join()
    .unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

// Install latency is printed for the record, never asserted on.
#[allow(clippy::disallowed_methods)]
fn exercise(fw: &dyn Firewall, srv: &Netns, att: &Netns) {
    fw.setup().unwrap();
    fw.setup().unwrap(); // idempotent
    assert!(reaches(att, "198.18.0.2") && reaches(att, "198.18.0.3"));
    let ttl = Duration::from_secs(600);
    fw.ban(&[
        (net("198.18.0.2/32"), ttl),
        (net("203.0.113.0/24"), ttl),
        (net("2001:db8:1::/64"), ttl),
    ])
    .unwrap();
    let listed = fw.list().unwrap();
    for n in ["198.18.0.2/32", "203.0.113.0/24", "2001:db8:1::/64"] {
        assert!(listed.contains(&net(n)), "{n} not in {listed:?}");
    }
    assert!(
        !reaches(att, "198.18.0.2"),
        "{}: the banned source still gets through",
        fw.name()
    );
    assert!(
        reaches(att, "198.18.0.3"),
        "{}: the clean source is dropped too",
        fw.name()
    );
    // A spoofer can aim a ban at any address, so a ban must not cut the
    // host off from it: only TCP to the protected port is dropped.
    assert!(
        reaches_port(att, "198.18.0.2", 7001),
        "{}: a ban dropped TCP to a port it does not protect",
        fw.name()
    );
    fw.unban(&[net("198.18.0.2/32"), net("192.0.2.9/32")]).unwrap();
    assert!(!fw.list().unwrap().contains(&net("198.18.0.2/32")));
    assert!(
        reaches(att, "198.18.0.2"),
        "{}: unbanned source still dropped",
        fw.name()
    );

    // One batch for many addresses: one process, one transaction.
    let many: Vec<(IpNet, Duration)> = (0..1000u32)
        .map(|i| {
            (
                IpNet::from(std::net::IpAddr::from((0xC612_0000u32 | (i + 10)).to_be_bytes())),
                ttl,
            )
        })
        .collect();
    let t = Instant::now();
    fw.ban(&many).unwrap();
    let batch = t.elapsed();
    let mut single = Vec::new();
    for (n, ttl) in many.iter().take(50) {
        let t = Instant::now();
        fw.ban(&[(*n, *ttl)]).unwrap();
        single.push(t.elapsed());
    }
    single.sort();
    eprintln!(
        "{}: 1000 bans in one batch {batch:?}; single bans p50 {:?}, max {:?}",
        fw.name(),
        single[single.len() / 2],
        single[single.len() - 1]
    );
    assert!(fw.list().unwrap().len() >= 1000);
    // Bans and lifts together, in one go; an absent lift is ignored.
    fw.apply(
        &[(net("198.18.0.2/32"), ttl)],
        &[many[0].0, many[1].0, net("192.0.2.9/32")],
    )
    .unwrap();
    let listed = fw.list().unwrap();
    assert!(listed.contains(&net("198.18.0.2/32")), "{}", fw.name());
    assert!(!listed.contains(&many[0].0) && !listed.contains(&many[1].0));
    assert!(listed.contains(&many[2].0));
    assert!(!reaches(att, "198.18.0.2"), "{}", fw.name());
    fw.teardown().unwrap();
    assert!(
        reaches(att, "198.18.0.2"),
        "{}: teardown left packets dropped",
        fw.name()
    );
    let _ = srv;
}

#[test]
fn nftables_bans_drop_packets_and_clean_up() {
    let Some((srv, att)) = pair() else { return };
    let fw = Nftables::new(Duration::from_secs(600), &[PROTECTED]).in_netns(srv.name());
    assert!(
        fw.available(),
        "nft is not installed (scripts/test installs nftables)"
    );
    exercise(&fw, &srv, &att);
    let tables = srv.exec(&["nft", "list", "tables"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("palisade"),
        "teardown left the table"
    );
}

#[test]
fn iptables_bans_drop_packets_and_clean_up() {
    let Some((srv, att)) = pair() else { return };
    let fw = Iptables::new(Duration::from_secs(600), &[PROTECTED]).in_netns(srv.name());
    assert!(
        fw.available(),
        "iptables/ipset are not installed (scripts/test installs them)"
    );
    exercise(&fw, &srv, &att);
    let rules = srv.exec(&["iptables", "-t", "raw", "-S"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("PALISADE"),
        "teardown left the chain"
    );
    assert!(
        !srv.exec(&["ipset", "list", "palisade4"])
            .unwrap()
            .status
            .success(),
        "teardown left the set"
    );
}

#[test]
fn dry_run_changes_nothing_in_the_kernel() {
    let Some((srv, att)) = pair() else { return };
    let fw = DryRun::default();
    fw.setup().unwrap();
    fw.ban(&[(net("198.18.0.2/32"), Duration::from_secs(60))])
        .unwrap();
    assert!(fw.list().unwrap().contains(&net("198.18.0.2/32")));
    assert!(reaches(&att, "198.18.0.2"), "a dry run dropped packets");
    let tables = srv.exec(&["nft", "list", "tables"]).unwrap();
    assert!(String::from_utf8_lossy(&tables.stdout).trim().is_empty());
}

/// Seconds left on `198.18.0.2`'s ban, as the kernel reports it.
fn expires_in(srv: &Netns, fw: &dyn Firewall) -> u64 {
    if fw.name() == "nftables" {
        let out = srv
            .exec(&["nft", "-j", "list", "set", "inet", "palisade", "ban4"])
            .unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let set = doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|i| i.get("set"))
            .unwrap();
        let elem = set["elem"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["elem"]["val"] == "198.18.0.2")
            .unwrap_or_else(|| panic!("198.18.0.2 not in {set}"));
        elem["elem"]["expires"].as_u64().unwrap()
    } else {
        let out = srv.exec(&["ipset", "save", "palisade4"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.contains(" 198.18.0.2 "))
            .unwrap_or_else(|| panic!("198.18.0.2 not in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

/// A ban given again with another duration holds for the new one in the
/// kernel, longer or shorter, not for whatever the first one said.
fn reban(fw: &dyn Firewall, srv: &Netns) {
    fw.setup().unwrap();
    let addr = net("198.18.0.2/32");
    fw.ban(&[(addr, Duration::from_secs(60))]).unwrap();
    assert!(expires_in(srv, fw) <= 60, "{}", fw.name());
    fw.apply(&[(addr, Duration::from_secs(7200))], &[addr]).unwrap();
    let longer = expires_in(srv, fw);
    assert!(
        (3600..=7200).contains(&longer),
        "{}: a re-ban for 2 h left {longer}s",
        fw.name()
    );
    fw.apply(&[(addr, Duration::from_secs(30))], &[addr, net("198.18.0.3/32")])
        .unwrap();
    let shorter = expires_in(srv, fw);
    assert!(shorter <= 30, "{}: a re-ban for 30 s left {shorter}s", fw.name());
    assert_eq!(fw.list().unwrap().len(), 1, "{}", fw.name());
    fw.teardown().unwrap();
}

#[test]
fn nftables_reban_sets_the_new_timeout() {
    let Some((srv, _att)) = pair() else { return };
    let fw = Nftables::new(Duration::from_secs(600), &[PROTECTED]).in_netns(srv.name());
    assert!(fw.available(), "nft is not installed");
    reban(&fw, &srv);
}

#[test]
fn iptables_reban_sets_the_new_timeout() {
    let Some((srv, _att)) = pair() else { return };
    let fw = Iptables::new(Duration::from_secs(600), &[PROTECTED]).in_netns(srv.name());
    assert!(fw.available(), "iptables/ipset are not installed");
    reban(&fw, &srv);
}
