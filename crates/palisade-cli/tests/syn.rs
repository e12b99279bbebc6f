//! The SYN-flood defense end to end, as root, in network namespaces this
//! test creates (and always deletes): Palisade runs in a server namespace
//! on 198.18.3.1; an attacker namespace floods it with a bounded burst of
//! SYNs from 198.18.3.2 (hping3: 3 000 packets at 5 000/s) while a client
//! on 198.18.3.3 must keep getting answers.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use palisade_kernel::netns::Netns;

mod common;
use common::{Reaped, demo_in, get, start_in};

fn topology() -> Option<(Netns, Netns)> {
    let srv = Netns::for_test("synsrv")?;
    let att = Netns::for_test("synatt")?;
    srv.link(&att, "198.18.3.1/24", &["198.18.3.2/24", "198.18.3.3/24"])
        .unwrap();
    Some((srv, att))
}

fn json(resp: &str) -> serde_json::Value {
    serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap()
}

fn start(srv: &Netns, config: &std::path::Path) -> Reaped {
    start_logging(srv, config, None)
}

/// Starts the daemon; what it logs after starting goes to `log_file`.
fn start_logging(srv: &Netns, config: &std::path::Path, log_file: Option<&std::path::Path>) -> Reaped {
    start_in(srv, &[], config, log_file, 50).0
}

/// The demo upstream on 127.0.0.1:8081 inside `srv`.
fn demo(srv: &Netns) -> Reaped {
    demo_in(srv, "127.0.0.1:8081")
}

/// What a program printed inside `ns`.
fn out(ns: &Netns, args: &[&str]) -> String {
    String::from_utf8(ns.exec(args).unwrap().stdout).unwrap()
}

/// A fresh directory for one test's config and data.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stop(mut p: Reaped) {
    let _ = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status();
    let _ = p.0.wait();
}

/// `palisade bans ARGS` against the daemon in `srv`; its output.
fn bans_cli(srv: &Netns, args: &[&str]) -> String {
    let out = srv
        .exec(
            &[
                &[env!("CARGO_BIN_EXE_palisade"), "bans"][..],
                args,
                &["--admin", "127.0.0.1:9090", "--token", "t0ken-0123456789"],
            ]
            .concat(),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "bans {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("never happened: {what}");
}

fn flood(att: &Netns, packets: u32) {
    flood_as(att, None, packets);
}

/// Bounded: `packets` SYNs at 5 000/s, each claiming to come from `source`
/// when one is given.
fn flood_as(att: &Netns, source: Option<&str>, packets: u32) {
    let count = packets.to_string();
    let mut args = vec!["hping3", "-q", "-S"];
    if let Some(source) = source {
        args.extend(["-a", source]);
    }
    args.extend(["-p", "8080", "-i", "u200", "-c", &count, "198.18.3.1"]);
    let out = att
        .exec(&args)
        .expect("hping3 is needed (scripts/test installs it)");
    // hping3 exits 1 when nothing answers, which is the point.
    assert!(out.status.code().is_some(), "hping3 was killed");
}

/// A SYN flood from random sources, one every `interval` (hping3's
/// `-i`), in the background; joined for hping3's exit.
fn rand_source_flood(
    att: &Netns,
    interval: &str,
    packets: u32,
) -> std::thread::JoinHandle<std::process::Output> {
    let name = att.name().to_owned();
    let (interval, count) = (interval.to_owned(), packets.to_string());
    std::thread::spawn(move || {
        Command::new("ip")
            .args(["netns", "exec", &name, "hping3", "-q", "-S", "--rand-source"])
            .args(["-p", "8080", "-i", &interval, "-c", &count, "198.18.3.1"])
            .output()
            .unwrap()
    })
}

fn syn_stats(srv: &Netns) -> serde_json::Value {
    json(&get(srv, None, "127.0.0.1:9090", "/syn-stats").unwrap())
}

/// Whether `/syn-stats` lists a ban of exactly `ip`.
fn banned(stats: &serde_json::Value, ip: &str) -> bool {
    stats["bans"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["net"] == format!("{ip}/32"))
}

/// Whether the proxy answers `from` (an address in `ns`) with a 200.
fn answers(ns: &Netns, from: &str) -> bool {
    get(ns, Some(from), "198.18.3.1:8080", "/").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
}

fn config(dir: &std::path::Path, firewall: &str) -> std::path::PathBuf {
    config_with(dir, firewall, "")
}

/// `extra` goes right after the `[syn]` keys. XDP is off unless `extra`
/// turns it on: with it, banned packets die before nftables can count them.
fn config_with(dir: &std::path::Path, firewall: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{firewall}.toml"));
    let xdp = if extra.contains("xdp =") {
        ""
    } else {
        "xdp = \"off\"\n"
    };
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"198.18.3.1:8080\"\nupstreams = [\"http://127.0.0.1:8081\"]\n\
             drain_delay = \"0s\"\n\
             [admin]\nlisten = \"127.0.0.1:9090\"\ntoken = \"t0ken-0123456789\"\n\
             [state]\ndata_dir = \"{}\"\n\
             [syn]\nfirewall = \"{firewall}\"\npoll_interval = \"100ms\"\nreconcile_interval = \"300ms\"\n{xdp}{extra}",
            dir.join(firewall).display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_syn_flood_is_banned_in_the_kernel_and_the_legit_client_is_served() {
    let Some((srv, att)) = topology() else { return };
    let dir = scratch("palisade-syn");
    let _demo = demo(&srv);
    let cfg = config(&dir, "nftables");
    let daemon = start(&srv, &cfg);
    eventually("the legit client is served", || answers(&att, "198.18.3.3"));
    let stats = syn_stats(&srv);
    assert_eq!(stats["capture"], true, "{stats}");
    assert_eq!(stats["firewall"], "nftables", "{stats}");

    flood(&att, 3000);
    let stats = syn_stats(&srv);
    let bans = stats["bans"].as_array().unwrap();
    let ban = bans
        .iter()
        .find(|b| b["net"] == "198.18.3.2/32")
        .unwrap_or_else(|| panic!("not banned: {stats}"));
    assert_eq!(ban["reason"], "syn_flood");
    // Right after the flood its last 100 ms may still count as an attack.
    let state = stats["mitigation"]["state"].as_str().unwrap();
    assert!(matches!(state, "bans_active" | "banning_offenders"), "{stats}");
    assert!(stats["syns_total"].as_u64().unwrap() >= 100, "{stats}");
    // The same counts as counters in the metrics, read after the stats.
    let counter = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    let metrics = get(&srv, None, "127.0.0.1:9090", "/metrics").unwrap();
    assert!(
        metrics.contains("# TYPE palisade_syn_seen_total counter"),
        "{metrics}"
    );
    let seen = counter(&metrics, "palisade_syn_seen_total");
    assert!(seen >= stats["syns_total"].as_u64().unwrap(), "{seen} vs {stats}");
    assert!(counter(&metrics, "palisade_syn_bans_installed_total") >= 1);
    eventually("the kernel's counters reach the metrics", || {
        let m = get(&srv, None, "127.0.0.1:9090", "/metrics").unwrap();
        counter(&m, "palisade_kernel_tcp_total{kind=\"passive_opens\"}") >= 1
            && counter(&m, "palisade_syn_seen_total") >= seen
    });
    let latency = ban["ban_latency_ms"].as_f64().unwrap();
    let install = ban["install_ms"].as_f64().unwrap();
    // The kernel set holds it, and its rule dropped the rest of the flood.
    let set = out(&srv, &["nft", "-j", "list", "set", "inet", "palisade", "ban4"]);
    assert!(set.contains("198.18.3.2"), "{set}");
    let chain = out(
        &srv,
        &["nft", "-j", "list", "chain", "inet", "palisade", "prerouting"],
    );
    let chain: serde_json::Value = serde_json::from_str(&chain).unwrap();
    let dropped: u64 = chain["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["rule"]["expr"].as_array())
        .flat_map(|e| e.iter())
        .filter_map(|x| x["counter"]["packets"].as_u64())
        .sum();
    assert!(dropped > 0, "nothing dropped: {chain}");
    eprintln!(
        "SYN flood of 3000 at 5000/s: banned {latency:.1} ms after its first SYN (nft batch {install:.1} ms); \
         {} SYNs reached the stack before the ban, {dropped} dropped by nftables",
        3000u64.saturating_sub(dropped)
    );
    // The attacker cannot connect; the legit neighbour still can.
    assert!(get(&att, Some("198.18.3.2"), "198.18.3.1:8080", "/").is_none());
    let legit = get(&att, Some("198.18.3.3"), "198.18.3.1:8080", "/").unwrap();
    assert!(legit.starts_with("HTTP/1.1 200"), "{legit}");
    // Reputation: -30.
    let rep = json(&get(&srv, None, "127.0.0.1:9090", "/api/v1/reputation/198.18.3.2").unwrap());
    assert_eq!(rep["events"][0]["kind"], "syn_flood", "{rep}");
    // 70 - 30, plus a few seconds of recovery at 1 point/minute.
    assert!(rep["score"].as_f64().unwrap() < 41.0, "{rep}");

    // Someone flushes our set: the reconciler puts the ban back.
    srv.run(&["nft", "flush", "set", "inet", "palisade", "ban4"])
        .unwrap();
    eventually("the flushed ban is repaired", || {
        let set = out(&srv, &["nft", "-j", "list", "set", "inet", "palisade", "ban4"]);
        set.contains("198.18.3.2")
    });

    // The operator's view and hands: palisade bans list|del|add.
    let cli = |args: &[&str]| bans_cli(&srv, args);
    let listed = cli(&["list"]);
    assert!(
        listed.contains("198.18.3.2/32") && listed.contains("syn_flood"),
        "{listed}"
    );
    cli(&["del", "198.18.3.2/32"]);
    eventually("the unbanned attacker connects again", || {
        get(&att, Some("198.18.3.2"), "198.18.3.1:8080", "/").is_some()
    });
    cli(&["add", "198.18.3.2", "--duration", "5m"]);
    assert!(
        get(&att, Some("198.18.3.2"), "198.18.3.1:8080", "/").is_none(),
        "the admin ban did not hold"
    );
    assert!(cli(&["list"]).contains("admin"));

    // Exit removes our rules; a restart restores the ban from the data dir.
    stop(daemon);
    let tables = out(&srv, &["nft", "list", "tables"]);
    assert!(!tables.contains("palisade"), "rules left behind: {tables}");
    let again = start(&srv, &cfg);
    let set = out(&srv, &["nft", "-j", "list", "set", "inet", "palisade", "ban4"]);
    assert!(set.contains("198.18.3.2"), "ban not restored: {set}");
    stop(again);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kill -9` leaves no chance to clean up or save: the kernel set keeps the
/// bans while the daemon is dead (nftables), and the restarted daemon
/// takes them back from `bans.json` in the `[state]` directory with their
/// original expiry, in the kernel (nftables) or at accept (dry run).
#[test]
fn bans_survive_kill_9_and_a_restart() {
    let Some((srv, att)) = topology() else { return };
    let dir = scratch("palisade-syn-kill");
    let _demo = demo(&srv);
    for firewall in ["nftables", "dry-run"] {
        let cfg = config(&dir, firewall);
        let mut daemon = start(&srv, &cfg);
        eventually("the legit client is served", || answers(&att, "198.18.3.3"));
        bans_cli(&srv, &["add", "198.18.3.2", "--duration", "10m"]);
        assert!(
            get(&att, Some("198.18.3.2"), "198.18.3.1:8080", "/").is_none(),
            "{firewall}: the ban did not hold"
        );
        let expires_in = |srv: &Netns| {
            let stats = syn_stats(srv);
            stats["bans"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["net"] == "198.18.3.2/32")
                .map(|b| b["expires_in_secs"].as_u64().unwrap())
        };
        let before = expires_in(&srv).expect("the ban is listed");
        // Long enough that a ban made afresh at restart would expire later.
        std::thread::sleep(Duration::from_secs(2));
        let kernel_set = || out(&srv, &["nft", "-j", "list", "set", "inet", "palisade", "ban4"]);

        daemon.0.kill().unwrap();
        let _ = daemon.0.wait();
        if firewall == "nftables" {
            assert!(
                kernel_set().contains("198.18.3.2"),
                "the dead daemon's ban is gone from the kernel"
            );
        }
        let again = start(&srv, &cfg);
        let after = expires_in(&srv).expect("the ban is listed after the restart");
        assert!(
            after < before,
            "{firewall}: the ban was not restored as it was ({before} s, then {after} s)"
        );
        if firewall == "nftables" {
            assert!(
                kernel_set().contains("198.18.3.2"),
                "ban not in the kernel after the restart"
            );
        } else {
            let tables = out(&srv, &["nft", "list", "tables"]);
            assert!(tables.trim().is_empty(), "a dry run changed the kernel: {tables}");
        }
        assert!(
            get(&att, Some("198.18.3.2"), "198.18.3.1:8080", "/").is_none(),
            "{firewall}: served after the restart"
        );
        let legit = get(&att, Some("198.18.3.3"), "198.18.3.1:8080", "/").unwrap();
        assert!(legit.starts_with("HTTP/1.1 200"), "{legit}");
        stop(again);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn in_dry_run_the_kernel_is_untouched() {
    let Some((srv, att)) = topology() else { return };
    let dir = scratch("palisade-syn-dry");
    let cfg = config(&dir, "dry-run");
    let daemon = start(&srv, &cfg);
    flood(&att, 3000);
    let stats = syn_stats(&srv);
    assert_eq!(stats["firewall"], "dry-run");
    assert!(banned(&stats, "198.18.3.2"), "{stats}");
    let tables = out(&srv, &["nft", "list", "tables"]);
    assert!(tables.trim().is_empty(), "a dry run changed the kernel: {tables}");
    stop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn trusted_proxies_are_never_banned_for_their_syn_rate() {
    let Some((srv, att)) = topology() else { return };
    let dir = scratch("palisade-syn-exempt");
    // A load balancer opens connections by the thousand: its SYN rate is
    // no offence. (The same flood from an ordinary source is banned above.)
    let trusted = "\n[clients]\ntrusted_proxies = [\"198.18.3.2/32\"]\n";
    let daemon = start(&srv, &config_with(&dir, "dry-run", trusted));
    flood(&att, 3000);
    let stats = syn_stats(&srv);
    assert!(
        stats["syns_total"].as_u64().unwrap() >= 1000,
        "the flood was not seen: {stats}"
    );
    assert_eq!(stats["bans"].as_array().unwrap().len(), 0, "{stats}");
    stop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_nftables_the_iptables_path_bans() {
    let Some((srv, att)) = topology() else { return };
    let dir = scratch("palisade-syn-ipt");
    let daemon = start(&srv, &config(&dir, "iptables"));
    flood(&att, 3000);
    let stats = syn_stats(&srv);
    assert_eq!(stats["firewall"], "iptables", "{stats}");
    let set = out(&srv, &["ipset", "save", "palisade4"]);
    assert!(set.contains("198.18.3.2"), "{set}");
    assert!(get(&att, Some("198.18.3.2"), "198.18.3.1:8080", "/").is_none());
    stop(daemon);
    let rules = out(&srv, &["iptables", "-t", "raw", "-S"]);
    assert!(!rules.contains("PALISADE"), "rules left behind: {rules}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_spoofed_flood_is_survived_with_syncookies() {
    let Some((srv, att)) = topology() else { return };
    let dir = scratch("palisade-syn-spoof");
    // The namespace's own sysctls: syncookies on, a small SYN backlog so the
    // flood would overflow it without them.
    srv.run(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=1"]).unwrap();
    srv.run(&["sysctl", "-qw", "net.ipv4.tcp_max_syn_backlog=128"])
        .unwrap();
    // SYN-ACKs to the spoofed sources go into the attacker namespace, which
    // does not forward: they end there, never leaving the test's namespaces.
    srv.run(&["ip", "route", "add", "default", "via", "198.18.3.2"])
        .unwrap();
    let _demo = demo(&srv);
    // The client below opens ~450 connections/s: far over the default
    // per-address rate of new connections (50/s), which Palisade would
    // rightly refuse at accept. Here the kernel's handshakes are measured.
    let daemon = start(
        &srv,
        &config_with(&dir, "nftables", "[connections]\nnew_per_ip_per_second = 0\n"),
    );
    let before = out(&srv, &["cat", "/proc/net/netstat"]);
    // Random source addresses: nothing to ban by address. Bounded: 30 000
    // SYNs at 10 000/s.
    let flood = rand_source_flood(&att, "u100", 30000);
    std::thread::sleep(Duration::from_millis(300));
    let legit = att
        .enter(|| {
            let to: SocketAddr = "198.18.3.1:8080".parse().unwrap();
            let from: SocketAddr = "198.18.3.3:0".parse().unwrap();
            // A client well under the per-source threshold (~400 SYN/s), or
            // it would rightly look like an attacker itself.
            let (mut ok, mut failed) = (0, 0);
            for _ in 0..1000 {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                s.bind(&from.into()).unwrap();
                let r = s.connect_timeout(&to.into(), Duration::from_secs(1));
                if r.is_ok() {
                    ok += 1;
                } else {
                    failed += 1;
                    if failed > 5 {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            ok
        })
        .join()
        .unwrap();
    flood.join().unwrap();
    let after = out(&srv, &["cat", "/proc/net/netstat"]);
    let counters = |t: &str| palisade_kernel::procnet::parse_counters(t).unwrap();
    let (b, a) = (counters(&before), counters(&after));
    let delta = |k: &str| a.get(k).copied().unwrap_or(0) - b.get(k).copied().unwrap_or(0);
    let stats = syn_stats(&srv);
    eprintln!(
        "spoofed flood (30 000 SYNs at 10 000/s, random sources): legit handshakes {legit}/1000; \
         cookies sent {}, listen drops {}, overflows {}; bans {}",
        delta("TcpExt.SyncookiesSent"),
        delta("TcpExt.ListenDrops"),
        delta("TcpExt.ListenOverflows"),
        stats["bans"].as_array().unwrap().len()
    );
    assert!(
        legit >= 999,
        "only {legit} of 1000 legit handshakes completed: {stats}"
    );
    assert!(
        delta("TcpExt.SyncookiesSent") > 0,
        "the flood never filled the SYN queue"
    );
    assert_eq!(delta("TcpExt.ListenDrops"), 0, "the listen queue dropped");
    assert!(
        stats["bans"].as_array().unwrap().is_empty(),
        "spoofed sources were banned: {stats}"
    );
    stop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn synproxy_answers_handshakes_when_asked_to() {
    let Some((srv, att)) = topology() else { return };
    let dir = scratch("palisade-syn-proxy");
    srv.run(&["ip", "route", "add", "default", "via", "198.18.3.2"])
        .unwrap();
    let _demo = demo(&srv);
    let daemon = start(
        &srv,
        &config_with(
            &dir,
            "nftables",
            "synproxy_ports = [8080]\n[connections]\nnew_per_ip_per_second = 0\n",
        ),
    );
    let ruleset = out(&srv, &["nft", "list", "ruleset"]);
    assert!(ruleset.contains("synproxy mss 1460"), "{ruleset}");
    eventually("the client is served through SYNPROXY", || {
        answers(&att, "198.18.3.3")
    });
    // Handshakes are completed by netfilter: none sits half-open on the
    // listener, and a burst of clients is served.
    let served = (0..20).filter(|_| answers(&att, "198.18.3.3")).count();
    assert_eq!(served, 20);
    let chain = out(&srv, &["nft", "list", "chain", "inet", "palisade", "syn_proxy"]);
    let handled: u64 = chain
        .split("counter packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // Each handshake passes the SYNPROXY rule twice (SYN, then ACK).
    assert!(handled >= 40, "SYNPROXY saw {handled} packets: {chain}");
    let stats = syn_stats(&srv);
    assert_eq!(stats["half_open"], 0, "{stats}");
    stop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn with_xdp_the_flood_dies_in_the_driver_hook() {
    let Some((srv, att)) = topology() else { return };
    if !palisade_kernel::xdp::XdpDefense::built() {
        assert!(
            std::env::var_os("CI").is_none(),
            "built without the XDP program in CI"
        );
        eprintln!("skipped: built without the XDP program (clang and libbpf-dev missing)");
        return;
    }
    let dir = scratch("palisade-syn-xdp");
    let _demo = demo(&srv);
    let daemon = start(&srv, &config_with(&dir, "nftables", "xdp = \"auto\"\n"));
    let stats = syn_stats(&srv);
    assert_eq!(stats["xdp"]["interfaces"], serde_json::json!(["v0"]), "{stats}");
    eventually("the legit client is served", || answers(&att, "198.18.3.3"));
    flood(&att, 3000);
    eventually("the XDP counters are read", || {
        let s = syn_stats(&srv);
        s["xdp"]["stats"]["dropped"].as_u64().is_some_and(|d| d > 0)
    });
    let stats = syn_stats(&srv);
    let ban = stats["bans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["net"] == "198.18.3.2/32")
        .cloned();
    let ban = ban.unwrap_or_else(|| panic!("not banned: {stats}"));
    eprintln!(
        "XDP: banned {:.1} ms after the first SYN; XDP saw {} SYNs and dropped {} packets",
        ban["ban_latency_ms"].as_f64().unwrap(),
        stats["xdp"]["stats"]["syns"],
        stats["xdp"]["stats"]["dropped"]
    );
    assert!(get(&att, Some("198.18.3.2"), "198.18.3.1:8080", "/").is_none());
    assert!(answers(&att, "198.18.3.3"));
    stop(daemon);
    let link = out(&srv, &["ip", "-d", "link", "show", "v0"]);
    assert!(
        !link.contains("prog/xdp") && !link.contains("xdpgeneric") && !link.contains("xdpdrv"),
        "XDP left attached: {link}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The attack that turned the defense against the service: SYNs spoofed to
/// come from the upstream's own address (hping3 `-a`). Banning that address
/// in `prerouting` dropped the upstream's answers, and every request after
/// the flood was a 502. The upstream runs on 198.18.3.4 in the other
/// namespace; a legitimate client on 198.18.3.3 must get 200 every time.
#[test]
fn a_flood_spoofed_as_the_upstream_never_cuts_the_upstream_off() {
    let Some((srv, att)) = topology() else { return };
    att.run(&["ip", "addr", "add", "198.18.3.4/24", "dev", "v1"])
        .unwrap();
    let dir = scratch("palisade-syn-spoof-upstream");
    let _upstream = demo_in(&att, "198.18.3.4:8081");
    let cfg = dir.join("spoof.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"198.18.3.1:8080\"\nupstreams = [\"http://198.18.3.4:8081\"]\n\
             drain_delay = \"0s\"\n\
             [upstream]\nconnect_timeout = \"1s\"\nresponse_timeout = \"3s\"\n\
             [admin]\nlisten = \"127.0.0.1:9090\"\ntoken = \"t0ken-0123456789\"\n\
             [state]\ndata_dir = \"{}\"\n\
             [syn]\nfirewall = \"nftables\"\npoll_interval = \"100ms\"\nxdp = \"off\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let daemon = start(&srv, &cfg);
    let legit = || answers(&att, "198.18.3.3");
    eventually("the legit client is served", legit);

    // Bounded: 3 000 SYNs at 5 000/s, every one claiming to be the upstream.
    flood_as(&att, Some("198.18.3.4"), 3000);

    let served = (0..20).filter(|_| legit()).count();
    let stats = syn_stats(&srv);
    assert_eq!(
        served, 20,
        "only {served}/20 requests answered 200 after the flood: {stats}"
    );
    assert!(!banned(&stats, "198.18.3.4"), "the upstream was banned: {stats}");
    assert!(
        stats["mitigation"]["bans_refused"]["upstream"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "the refusal is not shown: {stats}"
    );
    let metrics = get(&srv, None, "127.0.0.1:9090", "/metrics").unwrap();
    assert!(
        metrics.contains("palisade_bans_refused_total{reason=\"upstream\"}"),
        "{metrics}"
    );
    stop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every flooding address beyond `syn.ban_budget` a minute is refused a
/// ban: so many "sources" are more likely forged than real, and banning
/// each would ban bystanders. Syncookies, which need no source to be real,
/// take over, and `/syn-stats` says why.
#[test]
fn past_the_ban_budget_the_flood_gets_syncookies_instead_of_bans() {
    let Some((srv, att)) = topology() else { return };
    att.run(&["ip", "addr", "add", "198.18.3.5/24", "dev", "v1"])
        .unwrap();
    srv.run(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=0"]).unwrap();
    let dir = scratch("palisade-syn-budget");
    let daemon = start(&srv, &config_with(&dir, "dry-run", "ban_budget = 1\n"));
    flood_as(&att, Some("198.18.3.2"), 3000);
    flood_as(&att, Some("198.18.3.5"), 3000);
    eventually("syncookies are switched on", || {
        let s = syn_stats(&srv);
        s["mitigation"]["syncookies_reason"] == "ban_budget"
    });
    let stats = syn_stats(&srv);
    let bans = stats["bans"].as_array().unwrap();
    assert_eq!(bans.len(), 1, "the budget of one ban was overspent: {stats}");
    assert_eq!(stats["mitigation"]["state"], "syncookies_forced", "{stats}");
    assert!(
        stats["mitigation"]["bans_refused"]["budget"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{stats}"
    );
    assert_eq!(
        out(&srv, &["sysctl", "-n", "net.ipv4.tcp_syncookies"]).trim(),
        "1"
    );
    // Exit restores the namespace's own setting.
    stop(daemon);
    assert_eq!(
        out(&srv, &["sysctl", "-n", "net.ipv4.tcp_syncookies"]).trim(),
        "0"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A spoofed SYN flood whose SYN-ACKs are never answered: the kernel
/// retransmits them, the retransmit ratio stays high for
/// `syncookies_after`, and the daemon switches the namespace's own
/// `net.ipv4.tcp_syncookies` on; once the retransmits stop it stays low as
/// long, and the daemon puts the old value back. Each step is in the log
/// with its reason and in `/syn-stats`.
#[test]
fn sustained_syn_ack_retransmits_switch_syncookies_on_and_recovery_back() {
    let Some((srv, att)) = topology() else { return };
    // Off, for the daemon to switch on; two SYN-ACK retransmits (1 s and
    // 3 s after a SYN, the request dropped at 7 s) instead of five (63 s),
    // so the retransmits end seconds after the flood.
    srv.run(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=0"]).unwrap();
    srv.run(&["sysctl", "-qw", "net.ipv4.tcp_synack_retries=2"])
        .unwrap();
    // The SYN-ACKs must have a way out: with no route back to a spoofed
    // source the kernel drops its SYN before queueing it (ListenDrops),
    // nothing is ever retransmitted and TCPSynRetrans stays 0. Routed to
    // the attacker namespace, which does not forward, they end there
    // unanswered.
    srv.run(&["ip", "route", "add", "default", "via", "198.18.3.2"])
        .unwrap();
    let dir = scratch("palisade-syn-cookies");
    let log_file = dir.join("palisade.log");
    let daemon = start_logging(
        &srv,
        &config_with(&dir, "dry-run", "syncookies_after = \"2s\"\n"),
        Some(&log_file),
    );
    let stats = || syn_stats(&srv);
    let sysctl = || {
        out(&srv, &["sysctl", "-n", "net.ipv4.tcp_syncookies"])
            .trim()
            .to_owned()
    };
    let log = || std::fs::read_to_string(&log_file).unwrap_or_default();
    // Bounded: 8 000 SYNs at 1 000/s from random sources.
    let flood = rand_source_flood(&att, "u1000", 8000);
    let explain = || format!("/syn-stats: {}\nthe daemon said:\n{}", stats(), log());
    wait_for(
        "syncookies switched on for the retransmits",
        60,
        || stats()["mitigation"]["syncookies_forced"] == true,
        explain,
    );
    let on = stats();
    assert_eq!(on["mitigation"]["syncookies_reason"], "retransmits", "{on}");
    assert_eq!(on["mitigation"]["state"], "syncookies_forced", "{on}");
    assert_eq!(sysctl(), "1");
    let hping = flood.join().unwrap();
    assert!(hping.status.code().is_some(), "hping3 was killed");
    wait_for(
        "syncookies switched back after the flood",
        90,
        || stats()["mitigation"]["syncookies_forced"] == false,
        explain,
    );
    assert_eq!(sysctl(), "0", "the old value is back");
    let done = stats();
    let steps = done["mitigation"]["syncookie_steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{done}");
    assert_eq!(
        (&steps[0]["syncookies"], &steps[0]["reason"]),
        (&serde_json::json!(1), &serde_json::json!("retransmits")),
        "{done}"
    );
    assert!(steps[0]["ratio"].as_f64().unwrap() > 0.85, "{done}");
    assert_eq!(
        (&steps[1]["syncookies"], &steps[1]["reason"]),
        (&serde_json::json!(0), &serde_json::json!("recovered")),
        "{done}"
    );
    assert!(steps[1]["ratio"].as_f64().unwrap() < 0.425, "{done}");
    let said = log();
    let line = |what: &str| said.lines().find(|l| l.contains(what)).map(str::to_owned);
    let on_line = line("net.ipv4.tcp_syncookies=1").unwrap_or_else(|| panic!("{said}"));
    assert!(on_line.contains("retransmits"), "{on_line}");
    let off_line = line("back to normal").unwrap_or_else(|| panic!("{said}"));
    assert!(
        off_line.contains("recovered") && off_line.contains("tcp_syncookies=0"),
        "{off_line}"
    );
    eprintln!(
        "spoofed flood of 8 000 SYNs at 1 000/s: switched on at ratio {}, back at ratio {}",
        steps[0]["ratio"], steps[1]["ratio"]
    );
    stop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

fn wait_for(what: &str, seconds: u64, mut check: impl FnMut() -> bool, explain: impl Fn() -> String) {
    for _ in 0..seconds * 10 {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("never happened within {seconds} s: {what}\n{}", explain());
}

/// A counter or gauge from `/metrics` (0 when absent).
fn metric(srv: &Netns, name: &str) -> f64 {
    let text = get(srv, None, "127.0.0.1:9090", "/metrics").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `POST /api/v1/bans` from inside the server namespace's thread; the
/// status line, or what went wrong.
fn post_ban(ip: &str) -> String {
    let body = format!("{{\"ip\": \"{ip}\", \"duration\": \"10m\"}}");
    let exchange = || -> std::io::Result<String> {
        let mut s = TcpStream::connect("127.0.0.1:9090")?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            s,
            "POST /api/v1/bans HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer t0ken-0123456789\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.lines().next().unwrap_or_default().to_owned())
    };
    exchange().unwrap_or_else(|e| format!("{ip}: {e}"))
}

/// Every admin ban used to be its own `nft` process and its own fsync of
/// `bans.json`, run on the async worker that answered the request. Now a
/// ban thread takes whatever queued while its last batch ran: 1 000 bans
/// asked at once (50 connections, under `admin.max_connections`, 20 bans
/// each, each answered once its ban is in the kernel) come to far fewer firewall transactions, and the
/// proxy answers a client throughout.
#[test]
fn a_burst_of_admin_bans_is_installed_in_few_batches_while_the_proxy_answers() {
    let Some((srv, att)) = topology() else { return };
    let dir = scratch("palisade-syn-burst");
    let _demo = demo(&srv);
    let daemon = start(&srv, &config(&dir, "nftables"));
    let legit = || get(&att, Some("198.18.3.3"), "198.18.3.1:8080", "/");
    eventually("the legit client is served", || {
        legit().is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    });
    let batches_before = metric(&srv, "palisade_ban_batches_total");
    let asked_before = metric(&srv, "palisade_ban_requests_total");

    let burst_over = std::sync::atomic::AtomicBool::new(false);
    let (statuses, (during, answers)) = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            let (mut during, mut answers) = (0u32, Vec::new());
            loop {
                let was_over = burst_over.load(std::sync::atomic::Ordering::Acquire);
                let r = get(&att, Some("198.18.3.3"), "198.18.3.1:8080", "/");
                answers.push(r.map(|r| r.lines().next().unwrap_or_default().to_owned()));
                if was_over {
                    break;
                }
                during += 1;
                // Under the per-address limit of new connections (50/s).
                std::thread::sleep(Duration::from_millis(50));
            }
            (during, answers)
        });
        let statuses = srv
            .enter(|| {
                let workers: Vec<_> = (0..50u32)
                    .map(|w| {
                        std::thread::spawn(move || {
                            (0..20u32)
                                .map(|k| {
                                    let j = w * 20 + k;
                                    post_ban(&format!("198.19.{}.{}", j / 250, j % 250 + 1))
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().unwrap_or_else(|_| vec!["a worker panicked".into()]))
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap_or_else(|_| vec!["the burst panicked".into()]);
        burst_over.store(true, std::sync::atomic::Ordering::Release);
        (statuses, client.join().unwrap())
    });

    let refused: Vec<&String> = statuses.iter().filter(|s| !s.contains(" 200 ")).collect();
    assert!(
        refused.is_empty(),
        "{} bans not taken: {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    let batches = metric(&srv, "palisade_ban_batches_total") - batches_before;
    let asked = metric(&srv, "palisade_ban_requests_total") - asked_before;
    let set = out(&srv, &["nft", "-j", "list", "set", "inet", "palisade", "ban4"]);
    let in_kernel = set.matches("\"198.19.").count();
    let persisted: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("nftables").join("bans.json")).unwrap())
            .unwrap();
    eprintln!(
        "1 000 admin bans from 50 connections: {batches} firewall batches for {asked} changes; \
         {in_kernel} in the kernel set, {} persisted; the client got {} answers, {during} during the burst",
        persisted.len(),
        answers.len()
    );
    assert!(asked >= 1000.0, "{asked} changes counted");
    assert_eq!(in_kernel, 1000, "{set}");
    assert_eq!(persisted.len(), 1000);
    // Each ban alone would be 1 000 transactions.
    assert!(
        batches >= 1.0 && batches * 4.0 <= 1000.0,
        "{batches} batches for 1 000 bans"
    );
    assert!(during >= 1, "the client asked nothing during the burst");
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| !a.as_deref().is_some_and(|s| s.contains(" 200 ")))
        .collect();
    assert!(
        failed.is_empty(),
        "the proxy failed the client during the burst: {failed:?} of {}",
        answers.len()
    );
    stop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Seconds the kernel's nftables set still holds `ip` for.
fn kernel_expiry(srv: &Netns, ip: &str) -> Option<u64> {
    let set = out(srv, &["nft", "-j", "list", "set", "inet", "palisade", "ban4"]);
    let doc: serde_json::Value = serde_json::from_str(&set).ok()?;
    doc["nftables"].as_array()?.iter().find_map(|i| i.get("set"))?["elem"]
        .as_array()?
        .iter()
        .find(|e| e["elem"]["val"] == ip)
        .and_then(|e| e["elem"]["expires"].as_u64())
}

/// An address banned again for longer stays banned in the kernel for the
/// new duration, and for a shorter one the kernel follows too (Linux
/// before 6.10 kept an element's first timeout when it was added again).
#[test]
fn an_admin_reban_sets_the_kernel_expiry_to_the_new_duration() {
    let Some((srv, _att)) = topology() else { return };
    let dir = scratch("palisade-syn-reban");
    let daemon = start(&srv, &config(&dir, "nftables"));
    bans_cli(&srv, &["add", "198.19.7.7", "--duration", "1m"]);
    let first = kernel_expiry(&srv, "198.19.7.7").expect("the ban is in the kernel");
    assert!(first <= 60, "{first}");
    bans_cli(&srv, &["add", "198.19.7.7", "--duration", "2h"]);
    let longer = kernel_expiry(&srv, "198.19.7.7").expect("the re-ban is in the kernel");
    assert!(longer > 3600, "re-banned for 2 h, the kernel holds it {longer} s");
    bans_cli(&srv, &["add", "198.19.7.7", "--duration", "30s"]);
    let shorter = kernel_expiry(&srv, "198.19.7.7").expect("the re-ban is in the kernel");
    assert!(
        shorter <= 30,
        "re-banned for 30 s, the kernel holds it {shorter} s"
    );
    stop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A spoofed SYN flood gets one address of a network banned (here by
/// hand, as the SYN defense would); the operator then bans the whole
/// network (a /31 of two attacker addresses). nftables refuses an interval that overlaps one it holds, so
/// the wider ban used to fail as a whole (500, and no ban at all, not even
/// at accept): an attacker could shield its network from a ban by getting
/// one of its addresses banned first. And the other way round: an address
/// inside a banned network, banned again on its own, must not fail.
#[test]
fn a_ban_overlapping_one_in_force_still_holds() {
    let Some((srv, att)) = topology() else { return };
    for extra in ["198.18.3.6/24", "198.18.3.7/24"] {
        att.run(&["ip", "addr", "add", extra, "dev", "v1"]).unwrap();
    }
    let dir = scratch("palisade-syn-overlap");
    let _demo = demo(&srv);
    let daemon = start(&srv, &config(&dir, "nftables"));
    eventually("the legit client is served", || answers(&att, "198.18.3.7"));
    bans_cli(&srv, &["add", "198.18.3.6", "--duration", "10m"]);
    bans_cli(&srv, &["add", "198.18.3.6/31", "--duration", "1h"]);
    assert!(
        get(&att, Some("198.18.3.6"), "198.18.3.1:8080", "/").is_none(),
        "the address banned first is served"
    );
    // 198.18.3.7 is in the /31 too.
    assert!(
        get(&att, Some("198.18.3.7"), "198.18.3.1:8080", "/").is_none(),
        "the network ban does not hold"
    );
    let set = out(&srv, &["nft", "-j", "list", "set", "inet", "palisade", "ban4"]);
    assert!(set.contains("\"len\": 31"), "{set}");
    let legit = get(&att, Some("198.18.3.3"), "198.18.3.1:8080", "/").unwrap_or_default();
    assert!(legit.starts_with("HTTP/1.1 200"), "{legit}");
    // An address inside the banned network, banned on its own.
    bans_cli(&srv, &["add", "198.18.3.7", "--duration", "2h"]);
    // A restart restores all three (one failed transaction lost them all).
    let mut daemon = daemon;
    daemon.0.kill().unwrap();
    let _ = daemon.0.wait();
    let daemon = start(&srv, &config(&dir, "nftables"));
    let listed = bans_cli(&srv, &["list"]);
    for net in ["198.18.3.6", "198.18.3.7", "198.18.3.6/31"] {
        assert!(listed.contains(net), "{net} not restored: {listed}");
    }
    assert!(kernel_expiry(&srv, "198.18.3.6").is_none(), "the /31 holds it");
    // Lifting the network puts the addresses banned on their own into the
    // kernel, each for what is left of its own ban.
    bans_cli(&srv, &["del", "198.18.3.6/31"]);
    let left = kernel_expiry(&srv, "198.18.3.6").expect("198.18.3.6 in the kernel");
    assert!(left <= 600, "{left}");
    let left = kernel_expiry(&srv, "198.18.3.7").expect("198.18.3.7 in the kernel");
    assert!(left > 3600, "{left}");
    assert!(get(&att, Some("198.18.3.6"), "198.18.3.1:8080", "/").is_none());
    assert!(get(&att, Some("198.18.3.7"), "198.18.3.1:8080", "/").is_none());
    bans_cli(&srv, &["del", "198.18.3.7"]);
    eventually("the lifted address is served again", || {
        answers(&att, "198.18.3.7")
    });
    stop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A SYN flood spoofed as the host's own address: the kernel drops such
/// packets (a martian source) only after the capture has counted them, so
/// the address got banned, and then everything on the host that reaches
/// the listener through that address (a health check, a local agent, the
/// service calling its own public URL) was cut off. The host's own
/// addresses are never banned.
#[test]
fn a_flood_spoofed_as_the_host_itself_never_bans_it() {
    let Some((srv, att)) = topology() else { return };
    let dir = scratch("palisade-syn-spoof-self");
    let _demo = demo(&srv);
    let daemon = start(&srv, &config(&dir, "nftables"));
    let local = || answers(&srv, "198.18.3.1");
    eventually("the host reaches its own listener", local);
    flood_as(&att, Some("198.18.3.1"), 3000);
    let stats = syn_stats(&srv);
    assert!(
        !banned(&stats, "198.18.3.1"),
        "the host's own address was banned: {stats}"
    );
    let served = (0..20).filter(|_| local()).count();
    assert_eq!(
        served, 20,
        "the host reached its listener {served}/20 times: {stats}"
    );
    assert!(
        stats["mitigation"]["bans_refused"]["local"].as_u64().unwrap_or(0) >= 1,
        "the refusal is not shown: {stats}"
    );
    stop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ip netns exec` shows `/etc/netns/NAME/hosts` as `/etc/hosts`: a name
/// this test resolves, and moves, inside the server namespace only.
struct Hosts(std::path::PathBuf);

impl Hosts {
    fn new(ns: &Netns, text: &str) -> Self {
        let dir = std::path::Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = Self(dir);
        hosts.set(text);
        hosts
    }

    /// In place: the bind mount shows the file's inode, not its name.
    fn set(&self, text: &str) {
        std::fs::write(self.0.join("hosts"), text).unwrap();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The upstream is a name (as a cloud load balancer's is) and moves to
/// another address. The never-ban set was resolved at start and on reload
/// only, so a flood spoofed as the upstream's new address got it banned
/// and cut the proxy off from it. The set is rebuilt every
/// `syn.reconcile_interval`, and shown in `/syn-stats`.
#[test]
fn an_upstream_that_moves_to_another_address_stays_protected() {
    let Some((srv, att)) = topology() else { return };
    for extra in ["198.18.3.4/24", "198.18.3.5/24"] {
        att.run(&["ip", "addr", "add", extra, "dev", "v1"]).unwrap();
    }
    // Created before the daemon starts, so that its `ip netns exec` mounts it.
    let hosts = Hosts::new(&srv, "127.0.0.1 localhost\n198.18.3.4 upstream.test\n");
    let _upstream = demo_in(&att, "0.0.0.0:8081");
    let dir = scratch("palisade-syn-moving-upstream");
    let cfg = dir.join("moving.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"198.18.3.1:8080\"\nupstreams = [\"http://upstream.test:8081\"]\n\
             [admin]\nlisten = \"127.0.0.1:9090\"\ntoken = \"t0ken-0123456789\"\n\
             [state]\ndata_dir = \"{}\"\n\
             [syn]\nfirewall = \"nftables\"\npoll_interval = \"100ms\"\nreconcile_interval = \"300ms\"\nxdp = \"off\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let daemon = start(&srv, &cfg);
    let protected = |ip: &str| {
        let stats = syn_stats(&srv);
        stats["mitigation"]["never_ban"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["net"] == format!("{ip}/32") && n["reason"] == "upstream")
    };
    assert!(protected("198.18.3.4"));
    hosts.set("127.0.0.1 localhost\n198.18.3.5 upstream.test\n");
    eventually("the upstream's new address is protected", || {
        protected("198.18.3.5")
    });
    flood_as(&att, Some("198.18.3.5"), 3000);
    let stats = syn_stats(&srv);
    assert!(
        !banned(&stats, "198.18.3.5"),
        "the upstream's new address was banned: {stats}"
    );
    let served = (0..10).filter(|_| answers(&att, "198.18.3.3")).count();
    assert_eq!(served, 10, "{stats}");
    stop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
