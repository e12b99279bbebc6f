//! The shipped deployment files, taken at their word: Palisade runs with
//! exactly the privileges the edge systemd unit and the edge DaemonSet
//! grant (read from the files, applied with `setpriv`), in network
//! namespaces this test creates and always deletes, and every kernel piece
//! has to come up: SYN capture, nftables bans, XDP, the syncookie switch.
//! Under the plain unit's (none) the proxy has to serve.
//! The units go through `systemd-analyze`, the Kubernetes overlays through
//! `kubectl kustomize`, and the configs they mount through the loader.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use palisade_kernel::netns::Netns;

mod common;
use common::{Reaped, demo_in, get, start_in};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
/// `nobody`: what the unit's `DynamicUser=` amounts to, an unprivileged uid.
const NOBODY: &str = "65534";

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every value of `key=` in a unit file (repeated lines add up).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

/// `CAP_NET_ADMIN` / `NET_ADMIN` → `net_admin` (setpriv's spelling).
fn cap_name(c: &str) -> String {
    c.trim_matches(|c| c == '"' || c == '\'' || c == ',')
        .trim_start_matches("CAP_")
        .to_ascii_lowercase()
}

fn edge_unit_caps() -> Vec<String> {
    let unit = read("deploy/systemd/palisade-edge.service");
    let mut ambient: Vec<String> = unit_values(&unit, "AmbientCapabilities")
        .iter()
        .map(|c| cap_name(c))
        .collect();
    let mut bounding: Vec<String> = unit_values(&unit, "CapabilityBoundingSet")
        .iter()
        .map(|c| cap_name(c))
        .collect();
    ambient.sort();
    bounding.sort();
    assert_eq!(ambient, bounding, "the edge unit bounds what it grants");
    ambient
}

/// The `add:` list of the DaemonSet's container capabilities.
fn daemonset_caps() -> Vec<String> {
    let text = read("deploy/k8s/edge/daemonset.yaml");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("add: ["))
        .expect("capabilities.add in the DaemonSet");
    let list = line.split_once('[').unwrap().1.split_once(']').unwrap().0;
    let mut caps: Vec<String> = list.split(',').map(|c| cap_name(c.trim())).collect();
    caps.sort();
    assert!(
        text.contains("drop: [\"ALL\"]"),
        "the DaemonSet drops every other capability"
    );
    caps
}

/// The `setpriv` prefix granting exactly `caps`, as `uid`.
fn setpriv(uid: &str, caps: &[String]) -> Vec<String> {
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec![
        "setpriv".to_owned(),
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".to_owned(),
        // NoNewPrivileges=yes / allowPrivilegeEscalation: false.
        "--no-new-privs".to_owned(),
        format!("--bounding-set={set}"),
        format!("--inh-caps={set}"),
    ];
    // An unprivileged user keeps capabilities across exec only as ambient
    // ones (systemd's AmbientCapabilities=); uid 0 gets the bounding set.
    if uid != "0" {
        args.push(format!("--ambient-caps={set}"));
    }
    args
}

fn topology(tag: &str, net: u8) -> Option<(Netns, Netns)> {
    let srv = Netns::for_test(&format!("{tag}s"))?;
    let att = Netns::for_test(&format!("{tag}a"))?;
    srv.link(
        &att,
        &format!("198.18.{net}.1/24"),
        &[&format!("198.18.{net}.2/24"), &format!("198.18.{net}.3/24")],
    )
    .unwrap();
    // SYN-ACKs to spoofed sources end in the attacker namespace.
    srv.run(&["ip", "route", "add", "default", "via", &format!("198.18.{net}.2")])
        .unwrap();
    Some((srv, att))
}

fn syn_stats(srv: &Netns) -> serde_json::Value {
    let r = get(srv, None, "127.0.0.1:9090", "/syn-stats").unwrap();
    serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap()
}

fn eventually(what: &str, log: &Path, mut check: impl FnMut() -> bool) {
    for _ in 0..400 {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    panic!("never happened: {what}; the daemon said:\n{log}");
}

fn hping(att: &Netns, net: u8, extra: &[&str], packets: u32, gap_us: u32) {
    let target = format!("198.18.{net}.1");
    let (count, gap) = (packets.to_string(), format!("u{gap_us}"));
    let args = [
        &["hping3", "-q", "-S", "-p", "8080", "-i", &gap, "-c", &count][..],
        extra,
        &[&target],
    ]
    .concat();
    let out = att
        .exec(&args)
        .expect("hping3 is needed (scripts/test installs it)");
    assert!(out.status.code().is_some(), "hping3 was killed");
}

/// A scratch directory the unprivileged user can write.
fn scratch(name: &str, uid: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let id: u32 = uid.parse().unwrap();
    std::os::unix::fs::chown(&dir, Some(id), Some(id)).unwrap();
    std::os::unix::fs::chown(dir.join("data"), Some(id), Some(id)).unwrap();
    dir
}

/// Palisade in `srv` under `prefix` (setpriv …); returns once it says it runs.
fn start(srv: &Netns, prefix: &[String], config: &Path, log_file: &Path) -> (Reaped, String) {
    // A refused BPF program brings the verifier's whole log.
    start_in(srv, prefix, config, Some(log_file), 2000)
}

/// What one run under a shipped privilege set proves about the kernel side.
fn kernel_defense_comes_up(tag: &str, net: u8, uid: &str, caps: &[String]) {
    let Some((srv, att)) = topology(tag, net) else {
        return;
    };
    let dir = scratch(&format!("palisade-deploy-{tag}"), uid);
    let config = dir.join("palisade.toml");
    // syncookies_after is tiny and the ratio low, so one poll that sees
    // mostly SYN-ACK retransmits flips the switch: what is tested is the
    // privilege to flip it, not the tuning.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"198.18.{net}.1:8080\"\nupstreams = [\"http://127.0.0.1:8081\"]\n\
             [admin]\nlisten = \"127.0.0.1:9090\"\ntoken = \"t0ken-0123456789\"\n\
             [state]\ndata_dir = \"{}\"\n\
             [connections]\nnew_per_ip_per_second = 0\n\
             [syn]\nfirewall = \"nftables\"\nxdp = \"auto\"\npoll_interval = \"100ms\"\n\
             syncookies_after = \"1ms\"\nsyncookies_ratio = 0.3\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    // The namespace's own sysctl starts off, for the switch to turn on.
    srv.run(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=0"]).unwrap();
    srv.run(&["sysctl", "-qw", "net.ipv4.tcp_max_syn_backlog=4096"])
        .unwrap();
    let prefix = setpriv(uid, caps);
    let log_file = dir.join("palisade.log");
    let (daemon, log) = start(&srv, &prefix, &config, &log_file);
    let pid = daemon.0.id();
    // It really runs with these privileges, no more and no fewer.
    assert_privileges(pid, uid, caps);

    let stats = syn_stats(&srv);
    assert_eq!(
        stats["capture"], true,
        "no SYN capture under {caps:?}: {stats}\n{log}"
    );
    assert_eq!(
        stats["firewall"], "nftables",
        "no nftables under {caps:?}: {stats}\n{log}"
    );
    if palisade_kernel::xdp::XdpDefense::built() {
        assert_eq!(
            stats["xdp"]["interfaces"],
            serde_json::json!(["v0"]),
            "XDP not attached under {caps:?}: {stats}\n{log}"
        );
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "built without the XDP program in CI"
        );
        eprintln!("XDP not checked: built without the XDP program (clang and libbpf-dev missing)");
    }
    // The exec probe of the DaemonSet, under the same privileges.
    let health = srv
        .exec(
            &[
                prefix.iter().map(String::as_str).collect::<Vec<_>>(),
                vec![
                    env!("CARGO_BIN_EXE_palisade"),
                    "health",
                    "--admin",
                    "127.0.0.1:9090",
                ],
            ]
            .concat(),
        )
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );

    // First, while the SYN queue is empty: spoofed sources never answer
    // their SYN-ACKs, the kernel retransmits them a second later, and the
    // daemon writes net.ipv4.tcp_syncookies=1. The switch wants two polls
    // in a row over the ratio, so the SYNs are spread over a second (600
    // at 500/s) and all fit the queue: their retransmits are spread too.
    let netstat = || {
        let text = String::from_utf8(srv.exec(&["cat", "/proc/net/netstat"]).unwrap().stdout).unwrap();
        palisade_kernel::procnet::parse_counters(&text).unwrap()
    };
    let before = netstat();
    hping(&att, net, &["--rand-source"], 600, 2000);
    // With syncookies_after this short it flips back as soon as the
    // retransmits stop: both writes are in the log, neither refused.
    let said = |what: &str| std::fs::read_to_string(&log_file).unwrap().contains(what);
    let flipped = || said("net.ipv4.tcp_syncookies=1") && said("back to normal: net.ipv4.tcp_syncookies=0");
    for _ in 0..600 {
        if flipped() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    if !flipped() {
        let after = netstat();
        let delta: Vec<String> = [
            "TcpExt.TCPSynRetrans",
            "TcpExt.ListenDrops",
            "TcpExt.SyncookiesSent",
        ]
        .iter()
        .map(|k| {
            format!(
                "{k} +{}",
                after.get(*k).unwrap_or(&0) - before.get(*k).unwrap_or(&0)
            )
        })
        .collect();
        panic!(
            "the syncookie switch never went on and off ({delta:?}); the daemon said:\n{}",
            std::fs::read_to_string(&log_file).unwrap()
        );
    }
    assert!(
        !said("cannot set"),
        "{}",
        std::fs::read_to_string(&log_file).unwrap()
    );
    let sysctl = srv.exec(&["cat", "/proc/sys/net/ipv4/tcp_syncookies"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "0");

    // A flood from one address (not .2: the default gateway is never
    // banned): banned in the kernel's set.
    hping(&att, net, &["-a", &format!("198.18.{net}.3")], 3000, 200);
    eventually("the flooding address is banned", &log_file, || {
        syn_stats(&srv)["bans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["net"] == format!("198.18.{net}.3/32"))
    });
    let set = srv
        .exec(&["nft", "-j", "list", "set", "inet", "palisade", "ban4"])
        .unwrap();
    let set = String::from_utf8(set.stdout).unwrap();
    assert!(set.contains(&format!("198.18.{net}.3")), "{set}");

    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_edge_unit_runs_the_kernel_defense_with_exactly_its_capabilities() {
    let unit = read("deploy/systemd/palisade-edge.service");
    let families = unit_values(&unit, "RestrictAddressFamilies");
    for needed in ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"] {
        assert!(
            families.iter().any(|f| f == needed),
            "{needed} missing: {families:?}"
        );
    }
    // /proc/sys read-only would make the syncookie switch impossible, and
    // a user namespace would make every capability useless on the host's network.
    assert!(!unit_values(&unit, "ProtectKernelTunables").contains(&"yes".to_owned()));
    assert!(!unit_values(&unit, "PrivateUsers").contains(&"yes".to_owned()));
    assert!(unit_values(&unit, "NoNewPrivileges").contains(&"yes".to_owned()));
    assert!(unit_values(&unit, "DynamicUser").contains(&"yes".to_owned()));
    let caps = edge_unit_caps();
    kernel_defense_comes_up("depu", 8, NOBODY, &caps);
}

#[test]
fn the_edge_daemonset_runs_the_kernel_defense_with_exactly_its_capabilities() {
    let caps = daemonset_caps();
    assert_eq!(
        caps,
        edge_unit_caps(),
        "the unit and the DaemonSet grant the same"
    );
    kernel_defense_comes_up("depk", 9, "0", &caps);
}

/// `/proc/PID/status` of the daemon started as `pid`: `ip netns exec`
/// either execs setpriv, which execs the daemon, or runs it as its child.
fn daemon_status(pid: u32) -> Option<String> {
    let child = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    let candidates = std::iter::once(pid.to_string()).chain(child.split_whitespace().map(str::to_owned));
    candidates
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .find(|s| s.lines().next() == Some("Name:\tpalisade"))
}

/// The mask `/proc/PID/status` shows for `caps` (numbers from
/// linux/capability.h).
fn cap_mask(caps: &[String]) -> String {
    let bit = |c: &str| match c {
        "net_bind_service" => 10,
        "net_admin" => 12,
        "net_raw" => 13,
        "bpf" => 39,
        other => panic!("{other}: add its number from linux/capability.h"),
    };
    format!("{:016x}", caps.iter().fold(0u64, |m, c| m | 1 << bit(c)))
}

/// The daemon started as `pid` runs as `uid` with exactly `caps`, and can
/// gain no other (bounding set, no_new_privs).
fn assert_privileges(pid: u32, uid: &str, caps: &[String]) {
    let status = daemon_status(pid).expect("the daemon's /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(field("Uid:").split_whitespace().next(), Some(uid), "{status}");
    let mask = cap_mask(caps);
    for set in ["CapPrm:", "CapEff:", "CapBnd:"] {
        assert_eq!(field(set), mask, "{set} for {caps:?}");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
}

/// The plain unit grants no capability (`CapabilityBoundingSet=` empty,
/// which is not the same as absent: absent grants them all) and runs as a
/// dynamic unprivileged user. The application proxy must serve under
/// exactly that, and the SYN defense must fall back to reading the
/// kernel's counters instead of failing the start.
#[test]
fn the_plain_unit_serves_with_no_capabilities() {
    let unit = read("deploy/systemd/palisade.service");
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        assert!(
            unit.lines().any(|l| l.trim() == format!("{key}=")),
            "the plain unit must set {key}= to nothing"
        );
    }
    assert!(unit_values(&unit, "DynamicUser").contains(&"yes".to_owned()));
    let Some(srv) = Netns::for_test("depp") else {
        return;
    };
    srv.run(&["ip", "link", "set", "lo", "up"]).unwrap();
    let _upstream = demo_in(&srv, "127.0.0.1:8081");
    let dir = scratch("palisade-deploy-plain", NOBODY);
    let config = dir.join("palisade.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\nupstreams = [\"http://127.0.0.1:8081\"]\n\
             [admin]\nlisten = \"127.0.0.1:9090\"\ntoken = \"t0ken-0123456789\"\n\
             [state]\ndata_dir = \"{}\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let log_file = dir.join("palisade.log");
    let (daemon, log) = start(&srv, &setpriv(NOBODY, &[]), &config, &log_file);
    assert_privileges(daemon.0.id(), NOBODY, &[]);

    // The demo upstream may still be starting.
    eventually("the proxy answers 200", &log_file, || {
        get(&srv, None, "127.0.0.1:8080", "/").is_some_and(|a| a.starts_with("HTTP/1.1 200"))
    });
    assert!(!log.contains("ERROR"), "{log}");
    // Without CAP_NET_RAW and CAP_NET_ADMIN: no capture, decisions only.
    let stats = syn_stats(&srv);
    assert_eq!(stats["capture"], false, "{stats}");
    assert_eq!(stats["firewall"], "dry-run", "{stats}");
    assert!(
        srv.exec(&[
            env!("CARGO_BIN_EXE_palisade"),
            "health",
            "--admin",
            "127.0.0.1:9090"
        ])
        .unwrap()
        .status
        .success()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status();
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The unit with the binary under test in place of /usr/local/bin/palisade.
fn unit_for_test(name: &str) -> PathBuf {
    let text = read(&format!("deploy/systemd/{name}"))
        .replace("/usr/local/bin/palisade", env!("CARGO_BIN_EXE_palisade"));
    let dir = std::env::temp_dir().join(format!("palisade-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(std::env::var_os("CI").is_none(), "{tool} is missing in CI");
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

#[test]
fn the_units_verify_and_the_plain_one_scores_at_most_3() {
    if !have("systemd-analyze") {
        return;
    }
    for (name, threshold) in [("palisade.service", "30"), ("palisade-edge.service", "30")] {
        let unit = unit_for_test(name);
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.trim().is_empty(), "{name}: {err}");
        // The exposure score is out of 10; the threshold out of 100.
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--threshold={threshold}"))
            .arg(&unit)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        let score = report.lines().last().unwrap_or_default();
        eprintln!("{name}: {score}");
        assert!(out.status.success(), "{name} is too exposed: {score}");
        let text = read(&format!("deploy/systemd/{name}"));
        assert!(unit_values(&text, "Type").contains(&"notify".to_owned()));
        assert!(unit_values(&text, "RestartPreventExitStatus").contains(&"78".to_owned()));
        assert!(text.contains("ExecStartPre=/usr/local/bin/palisade config check "));
    }
}

/// The YAML documents of one kustomize overlay.
fn render(overlay: &str) -> Vec<String> {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(Path::new(ROOT).join(overlay))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .split("\n---\n")
        .map(str::to_owned)
        .collect()
}

fn kinds(docs: &[String]) -> Vec<&str> {
    docs.iter()
        .filter_map(|d| d.lines().find_map(|l| l.strip_prefix("kind: ")))
        .collect()
}

#[test]
fn the_kubernetes_overlays_install_one_role_each() {
    if !have("kubectl") {
        return;
    }
    let proxy = render("deploy/k8s/proxy");
    let edge = render("deploy/k8s/edge");
    let (pk, ek) = (kinds(&proxy), kinds(&edge));
    assert!(
        pk.contains(&"Deployment") && pk.contains(&"PodDisruptionBudget") && !pk.contains(&"DaemonSet"),
        "{pk:?}"
    );
    assert!(ek.contains(&"DaemonSet") && !ek.contains(&"Deployment"), "{ek:?}");
    for doc in proxy.iter().chain(&edge) {
        if doc.contains("image:") {
            assert!(doc.contains("type: RuntimeDefault"), "no seccomp profile:\n{doc}");
            assert!(!doc.contains(":latest"), "unpinned image:\n{doc}");
        }
    }
    // Cluster mode: the key and the Redis password come from a Secret,
    // Redis has no default user and only Palisade's pods may reach it.
    let deployment = proxy
        .iter()
        .find(|d| d.contains("kind: Deployment") && d.contains("name: palisade\n"))
        .unwrap();
    for env in ["PALISADE_CLUSTER_KEY", "REDIS_PASSWORD"] {
        let at = deployment
            .find(&format!("name: {env}"))
            .unwrap_or_else(|| panic!("no {env}:\n{deployment}"));
        assert!(
            deployment[at..]
                .lines()
                .nth(2)
                .is_some_and(|l| l.contains("secretKeyRef")),
            "{env} is not from a Secret"
        );
    }
    // In the environment, after REDIS_PASSWORD (which it expands), and not
    // in args: a command line is readable by every user on the node.
    let url = deployment
        .find("name: PALISADE_REDIS_URL")
        .unwrap_or_else(|| panic!("no PALISADE_REDIS_URL:\n{deployment}"));
    assert!(
        deployment[url..]
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("value: redis://palisade:$(REDIS_PASSWORD)@palisade-redis:6379")),
        "{deployment}"
    );
    assert!(deployment.find("name: REDIS_PASSWORD").is_some_and(|p| p < url));
    assert!(
        !deployment.contains("--redis"),
        "the password in args:\n{deployment}"
    );
    let redis = proxy
        .iter()
        .find(|d| d.contains("name: palisade-redis\n") && d.contains("kind: Deployment"))
        .unwrap();
    // The ACL that tests/cluster.rs (an_acl_user_limited_to_palisade_keys_is_enough) runs against.
    let args: Vec<&str> = redis
        .lines()
        .skip_while(|l| !l.trim_start().trim_start_matches("- ").starts_with("args:"))
        .skip(1)
        .map_while(|l| l.trim_start().strip_prefix("- "))
        .map(|a| a.trim_matches(['"', '\'']))
        .collect();
    let acl = args.join(" ");
    assert!(acl.contains("--user default off --user palisade on >$(REDIS_PASSWORD) ~{palisade}:* ~palisade:* resetchannels +@all -@dangerous"), "{acl}");
    let policy = proxy
        .iter()
        .find(|d| d.contains("kind: NetworkPolicy"))
        .expect("no NetworkPolicy for Redis");
    assert!(
        policy.contains("app.kubernetes.io/name: palisade-redis")
            && policy.contains("app.kubernetes.io/name: palisade\n"),
        "{policy}"
    );
    let ds = edge.iter().find(|d| d.contains("kind: DaemonSet")).unwrap();
    assert!(ds.contains("requests:"), "{ds}");
    // Only the proxy port on node IPs; the admin API stays on loopback.
    assert_eq!(ds.matches("hostPort").count(), 1, "{ds}");
    assert!(!ds.contains("9090, hostPort"), "{ds}");
    assert!(ds.contains("hostPath"), "bans do not survive a restart:\n{ds}");
}

#[test]
fn the_shipped_configs_load_and_listen_where_they_must() {
    use palisade_proxy::config::Config;
    let load = |rel: &str| {
        Config::load(&Path::new(ROOT).join(rel), &Default::default()).unwrap_or_else(|e| panic!("{e}"))
    };
    let docker = load("deploy/docker/palisade.toml");
    assert!(
        docker.server.listen.ip().is_unspecified(),
        "-p 8080:8080 reaches nothing"
    );
    let edge = load("deploy/k8s/edge/palisade-edge.toml");
    assert!(
        edge.admin.listen.ip().is_loopback(),
        "admin API on the node's addresses"
    );
    assert!(edge.state.is_some(), "bans do not survive a restart");
    // Cluster mode refuses to start unsigned: the key comes from a Secret.
    let path = Path::new(ROOT).join("deploy/k8s/proxy/palisade.toml");
    let e = Config::load(&path, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("cluster.key: cluster mode needs a key"), "{e}");
    let with_key = palisade_proxy::config::Overrides {
        cluster_key: Some("k".repeat(64)),
        ..Default::default()
    };
    let proxy = Config::load(&path, &with_key).unwrap_or_else(|e| panic!("{e}"));
    assert!(proxy.cluster.is_some_and(|c| c.key.is_some()));
    assert!(!proxy.admin.listen.ip().is_loopback());
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("\"health\""));
    assert!(dockerfile.contains("org.opencontainers.image.version"));
    for from in dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM ") && !l.contains(" AS skeleton") && !l.contains("FROM toolchain"))
    {
        let image = from.split_whitespace().nth(1).unwrap();
        assert!(
            image.split(':').nth(1).is_some_and(|t| t.contains('.')),
            "unpinned base image: {from}"
        );
    }
}

/// What a service manager must wait for before it kills: the drain delay
/// (still serving), then the grace for in-flight requests, plus room for
/// the process to exit.
fn stop_budget(config: &palisade_proxy::config::Config) -> Duration {
    const MARGIN: Duration = Duration::from_secs(5);
    config.server.drain_delay + config.server.shutdown_grace + MARGIN
}

#[test]
fn service_managers_wait_out_the_drain_before_they_kill() {
    use palisade_proxy::config::{Config, Overrides, parse_duration};
    let key = Overrides {
        cluster_key: Some("k".repeat(32)),
        ..Overrides::default()
    };
    for (manifest, config) in [
        (
            "deploy/k8s/proxy/deployment.yaml",
            "deploy/k8s/proxy/palisade.toml",
        ),
        (
            "deploy/k8s/edge/daemonset.yaml",
            "deploy/k8s/edge/palisade-edge.toml",
        ),
    ] {
        let config = Config::load(&Path::new(ROOT).join(config), &key).unwrap_or_else(|e| panic!("{e}"));
        assert!(!config.server.drain_delay.is_zero(), "{manifest}: no drain delay");
        let text = read(manifest);
        let grace: u64 = yaml_value(&text, "terminationGracePeriodSeconds")
            .unwrap_or_else(|| panic!("{manifest}: no terminationGracePeriodSeconds"))
            .parse()
            .unwrap();
        let needed = stop_budget(&config);
        assert!(
            Duration::from_secs(grace) >= needed,
            "{manifest}: terminationGracePeriodSeconds {grace} < {needed:?}"
        );
        // The grace period counts from the start of preStop: a sleep there
        // would come on top of the daemon's own drain delay.
        assert!(
            !text.contains("preStop:"),
            "{manifest}: server.drain_delay already does a preStop sleep's waiting"
        );
    }
    // The units read the operator's /etc/palisade/palisade.toml: the defaults.
    let defaults = Config::quickstart(&Overrides::default()).unwrap();
    for unit in [
        "deploy/systemd/palisade.service",
        "deploy/systemd/palisade-edge.service",
    ] {
        let values = unit_values(&read(unit), "TimeoutStopSec");
        let [value] = values.as_slice() else {
            panic!("{unit}: TimeoutStopSec {values:?}");
        };
        // systemd reads a bare number as seconds.
        let timeout = if value.bytes().all(|b| b.is_ascii_digit()) {
            parse_duration(&format!("{value}s"))
        } else {
            parse_duration(value)
        }
        .unwrap_or_else(|e| panic!("{unit}: {e}"));
        let needed = stop_budget(&defaults);
        assert!(timeout >= needed, "{unit}: TimeoutStopSec={value} < {needed:?}");
    }
}

/// `key: value` of the first line in `doc` with that key (after `- `).
fn yaml_value<'a>(doc: &'a str, key: &str) -> Option<&'a str> {
    doc.lines().find_map(|l| {
        let l = l.trim_start().trim_start_matches("- ");
        l.strip_prefix(key)?
            .strip_prefix(": ")
            .map(|v| v.trim_matches('"'))
    })
}

#[test]
fn prometheus_finds_the_metrics_port_without_token() {
    if !have("kubectl") {
        return;
    }
    use palisade_proxy::config::{Config, Overrides};
    // Cluster mode needs the shared key, which comes from the environment.
    let key = Overrides {
        cluster_key: Some("k".repeat(32)),
        ..Overrides::default()
    };
    let config = Config::load(&Path::new(ROOT).join("deploy/k8s/proxy/palisade.toml"), &key)
        .unwrap_or_else(|e| panic!("{e}"));
    let metrics = config
        .admin
        .metrics_listen
        .expect("the proxy config sets admin.metrics_listen");
    assert!(
        metrics.ip().is_unspecified(),
        "Prometheus scrapes from outside the pod"
    );
    let port = metrics.port().to_string();

    let proxy = render("deploy/k8s/proxy");
    let deployment = proxy
        .iter()
        .find(|d| d.contains("kind: Deployment") && d.contains("name: palisade\n"))
        .unwrap();
    assert_eq!(
        yaml_value(deployment, "prometheus.io/port"),
        Some(port.as_str()),
        "{deployment}"
    );
    assert_eq!(yaml_value(deployment, "prometheus.io/path"), Some("/metrics"));
    // The container port named `metrics` is that port.
    let lines: Vec<&str> = deployment.lines().collect();
    let named = lines
        .windows(2)
        .find(|w| w[1].trim() == "name: metrics")
        .map(|w| w[0].trim().trim_start_matches("- "));
    assert_eq!(
        named,
        Some(format!("containerPort: {port}").as_str()),
        "{deployment}"
    );

    // The ServiceMonitor is a CRD: kubernetes-validate has no schema for it
    // (it warns and passes), so kustomize parses it here and the test checks
    // that it selects the metrics Service by its port name.
    let dir = std::env::temp_dir().join(format!("palisade-servicemonitor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("servicemonitor.yaml"),
        read("deploy/k8s/proxy/servicemonitor.yaml"),
    )
    .unwrap();
    std::fs::write(
        dir.join("kustomization.yaml"),
        "resources:\n  - servicemonitor.yaml\n",
    )
    .unwrap();
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let monitor = String::from_utf8(out.stdout).unwrap();
    assert_eq!(yaml_value(&monitor, "kind"), Some("ServiceMonitor"));
    assert_eq!(
        yaml_value(&monitor, "apiVersion"),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(yaml_value(&monitor, "port"), Some("metrics"));
    assert_eq!(yaml_value(&monitor, "path"), Some("/metrics"));
    let service = proxy
        .iter()
        .find(|d| d.contains("name: palisade-metrics"))
        .unwrap();
    assert_eq!(yaml_value(service, "kind"), Some("Service"));
    let selector = monitor.split("matchLabels:").nth(1).unwrap();
    for label in selector.lines().map(str::trim).filter(|l| l.contains(": ")) {
        assert!(
            service.lines().any(|l| l.trim() == label),
            "the Service lacks {label}:\n{service}"
        );
    }
    assert_eq!(yaml_value(service, "targetPort"), Some("metrics"));
    assert_eq!(
        yaml_value(service, "clusterIP"),
        Some("None"),
        "each pod is a target"
    );
}
