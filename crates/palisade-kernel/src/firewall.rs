//! Bans in the kernel: packets from a banned source are dropped
//! before they reach a socket.
//!
//! Three implementations of [`Firewall`]:
//! * [`Nftables`]: its own `inet palisade` table with one set per family
//!   (`ban4`, `ban6`: prefixes, per-element timeouts) and a `prerouting`
//!   chain at priority -300 (before connection tracking) that drops their
//!   members' TCP to the protected ports. Every change is one JSON batch on
//!   `nft -j -f -`'s stdin: one process and one kernel transaction per
//!   batch, however many addresses.
//! * [`Iptables`]: `ipset` sets (`palisade4`, `palisade6`, `hash:net` with
//!   timeouts, changed through one `ipset restore`) matched by a `PALISADE`
//!   chain in the raw table's PREROUTING, for TCP to the protected ports.
//! * [`DryRun`]: remembers and logs, changes nothing.
//!
//! A ban never drops all traffic from a source: only TCP to the ports it
//! protects. A source address is trivially spoofed, so a ban can land on
//! an address the host itself talks to (its upstream, its resolver); its
//! answers to our own connections must still arrive.
//!
//! Commands are argument vectors, never shell strings; addresses reach the
//! tools only as parsed [`IpNet`] values; the tools are found once, by
//! absolute path in the system directories ([`Tools`]), never through
//! `PATH` at each call.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{Value, json};

/// A firewall tool failed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The tool could not be started (not installed?).
    #[error("{tool}: cannot run: {source}")]
    Spawn {
        /// The program.
        tool: String,
        /// Why.
        source: std::io::Error,
    },
    /// The tool ran and refused.
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        /// The program and what it was asked.
        tool: String,
        /// Its exit status.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// No port to protect was given: a ban would have nothing to drop.
    #[error("no listener ports to protect")]
    NoPorts,
    /// The tool's output could not be understood.
    #[error("{tool}: unexpected output: {why}")]
    Output {
        /// The program.
        tool: String,
        /// What was wrong.
        why: String,
    },
}

/// The directories programs are taken from: root-owned system paths, not
/// whatever `PATH` the daemon was started with.
const SYSTEM_DIRS: [&str; 6] = [
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
    "/usr/local/sbin",
    "/usr/local/bin",
];

/// The absolute path of `program` in the system directories, if there.
pub fn locate(program: &str) -> Option<PathBuf> {
    SYSTEM_DIRS
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// The programs the firewalls run, by absolute path, found once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// `nft`.
    pub nft: PathBuf,
    /// `iptables`.
    pub iptables: PathBuf,
    /// `ip6tables`.
    pub ip6tables: PathBuf,
    /// `ipset`.
    pub ipset: PathBuf,
    /// `ip` (for `ip netns exec`).
    pub ip: PathBuf,
}

impl Tools {
    /// Each program from the system directories; one not found keeps its
    /// conventional `/usr/sbin` path, so the error names what is missing.
    pub fn locate() -> Self {
        let find = |p: &str| locate(p).unwrap_or_else(|| Path::new("/usr/sbin").join(p));
        Self {
            nft: find("nft"),
            iptables: find("iptables"),
            ip6tables: find("ip6tables"),
            ipset: find("ipset"),
            ip: find("ip"),
        }
    }
}

impl Default for Tools {
    fn default() -> Self {
        Self::locate()
    }
}

/// Kernel-level bans.
pub trait Firewall: Send + Sync {
    /// `nftables`, `iptables` or `dry-run`.
    fn name(&self) -> &'static str;
    /// Creates the table/sets/rules (idempotent: replaces our own rules).
    fn setup(&self) -> Result<(), FirewallError>;
    /// Bans networks for the given time, in one batch. One banned already
    /// may keep its old expiry: to change it, give it to [`Self::apply`]
    /// in both lists.
    fn ban(&self, bans: &[(IpNet, Duration)]) -> Result<(), FirewallError>;
    /// Lifts bans (absent ones are ignored).
    fn unban(&self, nets: &[IpNet]) -> Result<(), FirewallError>;
    /// Bans and lifts in one go: one kernel transaction where the tool
    /// allows it (nftables, ipset), so a batch of changes costs one process.
    /// A network in both is replaced: it holds for its new duration,
    /// whatever the one in force said.
    fn apply(&self, ban: &[(IpNet, Duration)], unban: &[IpNet]) -> Result<(), FirewallError> {
        self.unban(unban)?;
        self.ban(ban)
    }
    /// What the kernel holds now.
    fn list(&self) -> Result<BTreeSet<IpNet>, FirewallError>;
    /// Removes everything `setup` created.
    fn teardown(&self) -> Result<(), FirewallError>;
}

/// Runs `program args` (inside network namespace `netns` when given, via
/// `ip netns exec`), feeding `stdin`; returns stdout.
fn run(
    ip: &Path,
    netns: Option<&str>,
    program: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, FirewallError> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new(ip);
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let tool = format!("{} {}", program.display(), args.join(" "));
    let mut child = cmd.spawn().map_err(|source| FirewallError::Spawn {
        tool: program.display().to_string(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| FirewallError::Spawn {
                tool: tool.clone(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| FirewallError::Spawn {
        tool: tool.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(FirewallError::Failed {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The nftables implementation.
#[derive(Debug, Clone)]
pub struct Nftables {
    table: String,
    netns: Option<String>,
    default_timeout: Duration,
    ports: Vec<u16>,
    synproxy: Vec<u16>,
    tools: Tools,
}

impl Nftables {
    /// Our table in the current network namespace; bans drop TCP to
    /// `ports` (the listeners it protects).
    pub fn new(default_timeout: Duration, ports: &[u16]) -> Self {
        Self {
            table: "palisade".into(),
            netns: None,
            default_timeout,
            ports: ports.to_vec(),
            synproxy: Vec::new(),
            tools: Tools::locate(),
        }
    }

    /// Runs these programs instead of the located ones.
    pub fn with_tools(mut self, tools: Tools) -> Self {
        self.tools = tools;
        self
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
        run(
            &self.tools.ip,
            self.netns.as_deref(),
            &self.tools.nft,
            args,
            stdin,
        )
    }

    /// Answers handshakes to `ports` with the kernel's SYNPROXY: a SYN gets
    /// a cookie SYN-ACK from netfilter, and only a client that completes the
    /// handshake reaches the listener (no conntrack or SYN-queue entry per
    /// spoofed SYN). Needs conntrack; `nf_conntrack_tcp_loose` should be 0.
    pub fn with_synproxy(mut self, ports: &[u16]) -> Self {
        self.synproxy = ports.to_vec();
        self
    }

    /// Works inside network namespace `ns` (tests, and hosts where the
    /// daemon manages another namespace).
    pub fn in_netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_owned());
        self
    }

    /// Whether `nft` can be run here.
    pub fn available(&self) -> bool {
        self.run(&["--version"], None).is_ok()
    }

    fn batch(&self, commands: Vec<Value>) -> Result<(), FirewallError> {
        let doc = json!({ "nftables": commands }).to_string();
        self.run(&["-j", "-f", "-"], Some(&doc)).map(drop)
    }

    fn set_of(net: &IpNet) -> &'static str {
        match net {
            IpNet::V4(_) => "ban4",
            IpNet::V6(_) => "ban6",
        }
    }

    fn elem(net: &IpNet) -> Value {
        if net.prefix_len() == net.max_prefix_len() {
            json!(net.addr().to_string())
        } else {
            json!({ "prefix": { "addr": net.network().to_string(), "len": net.prefix_len() } })
        }
    }

    /// The batch that bans `bans`, lifts those of `unban` the kernel holds
    /// (`present`: deleting an absent element fails the whole batch) and
    /// replaces those in both, as one transaction.
    ///
    /// Adding an element the set holds is a no-op before Linux 6.10: it
    /// would keep its old timeout. So a replaced one is first added (a
    /// no-op when present), then deleted (now always present), then added
    /// with its own timeout; inside the transaction no packet sees the gap,
    /// and the kernel need not be asked whether it holds it.
    fn changes(&self, bans: &[(IpNet, Duration)], unban: &[IpNet], present: &BTreeSet<IpNet>) -> Vec<Value> {
        let element = |verb: &str, set: &str, elems: Vec<Value>| json!({verb: {"element": {"family": "inet", "table": self.table, "name": set, "elem": elems}}});
        let mut commands = Vec::new();
        for set in ["ban4", "ban6"] {
            let banned: Vec<&(IpNet, Duration)> =
                bans.iter().filter(|(n, _)| Self::set_of(n) == set).collect();
            let replaced: Vec<IpNet> = banned
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| unban.contains(n))
                .collect();
            if !replaced.is_empty() {
                let placeholders = replaced
                    .iter()
                    .map(|n| json!({"elem": {"val": Self::elem(n), "timeout": 1}}))
                    .collect();
                commands.push(element("add", set, placeholders));
                commands.push(element("delete", set, replaced.iter().map(Self::elem).collect()));
            }
            let gone: Vec<Value> = unban
                .iter()
                .filter(|n| Self::set_of(n) == set && !replaced.contains(n) && present.contains(n))
                .map(Self::elem)
                .collect();
            if !gone.is_empty() {
                commands.push(element("delete", set, gone));
            }
            if !banned.is_empty() {
                let elems = banned
                    .iter()
                    .map(|(n, ttl)| json!({"elem": {"val": Self::elem(n), "timeout": ttl.as_secs().max(1)}}))
                    .collect();
                commands.push(element("add", set, elems));
            }
        }
        commands
    }

    fn set_elements(&self, set: &str) -> Result<Vec<IpNet>, FirewallError> {
        let out = self.run(&["-j", "list", "set", "inet", &self.table, set], None)?;
        let bad = |why: &str| FirewallError::Output {
            tool: "nft list set".into(),
            why: why.to_owned(),
        };
        let doc: Value = serde_json::from_str(&out).map_err(|e| bad(&e.to_string()))?;
        let mut nets = Vec::new();
        for item in doc["nftables"]
            .as_array()
            .ok_or_else(|| bad("no nftables array"))?
        {
            let Some(elems) = item["set"]["elem"].as_array() else {
                continue;
            };
            for e in elems {
                // A plain address, a prefix, or either wrapped with its timeout.
                let v = if e.get("elem").is_some() {
                    &e["elem"]["val"]
                } else {
                    e
                };
                let net = if let Some(s) = v.as_str() {
                    s.parse::<std::net::IpAddr>().ok().map(IpNet::from)
                } else {
                    let p = &v["prefix"];
                    let addr = p["addr"].as_str().and_then(|a| a.parse().ok());
                    let len = p["len"].as_u64().and_then(|l| u8::try_from(l).ok());
                    addr.zip(len).and_then(|(a, l)| IpNet::new(a, l).ok())
                };
                nets.push(net.ok_or_else(|| bad(&format!("element {e}")))?);
            }
        }
        Ok(nets)
    }
}

impl Firewall for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn setup(&self) -> Result<(), FirewallError> {
        if self.ports.is_empty() {
            return Err(FirewallError::NoPorts);
        }
        let t = &self.table;
        let timeout = self.default_timeout.as_secs().max(1);
        let set = |name: &str, kind: &str| {
            json!({"add": {"set": {"family": "inet", "table": t, "name": name, "type": kind,
                "flags": ["interval", "timeout"], "timeout": timeout}}})
        };
        // `tcp dport` makes nft match TCP only: a banned address's UDP
        // (DNS answers), ICMP and its replies to our own connections pass.
        let rule = |proto: &str, set: &str| {
            json!({"add": {"rule": {"family": "inet", "table": t, "chain": "prerouting", "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": self.ports}}},
                {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "saddr"}}, "right": format!("@{set}")}},
                {"counter": null},
                {"drop": null}
            ]}}})
        };
        let chain = json!({"family": "inet", "table": t, "name": "prerouting"});
        let mut commands = vec![
            json!({"add": {"table": {"family": "inet", "name": t}}}),
            set("ban4", "ipv4_addr"),
            set("ban6", "ipv6_addr"),
            json!({"add": {"chain": {"family": "inet", "table": t, "name": "prerouting",
                "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}}}),
            json!({"flush": {"chain": chain}}),
            rule("ip", "ban4"),
            rule("ip6", "ban6"),
        ];
        if !self.synproxy.is_empty() {
            let ports = json!({"match": {"op": "==",
                "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": self.synproxy}}});
            let chain = |name: &str, hook: &str, prio: i32| {
                [
                    json!({"add": {"chain": {"family": "inet", "table": t, "name": name,
                        "type": "filter", "hook": hook, "prio": prio, "policy": "accept"}}}),
                    json!({"flush": {"chain": {"family": "inet", "table": t, "name": name}}}),
                ]
            };
            let rule = |chain: &str, expr: Vec<Value>| json!({"add": {"rule": {"family": "inet", "table": t, "chain": chain, "expr": expr}}});
            // SYNs skip conntrack (after the ban rules, which run at -300)...
            commands.extend(chain("syn_notrack", "prerouting", -299));
            commands.push(rule(
                "syn_notrack",
                vec![
                    ports.clone(),
                    json!({"match": {"op": "==", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                        ["fin", "syn", "rst", "ack"]]}, "right": "syn"}}),
                    json!({"notrack": null}),
                ],
            ));
            // ...and SYNPROXY answers them and the ACKs that come back.
            commands.extend(chain("syn_proxy", "input", 0));
            commands.push(rule(
                "syn_proxy",
                vec![
                    ports.clone(),
                    json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["invalid", "untracked"]}}),
                    json!({"counter": null}),
                    json!({"synproxy": {"mss": 1460, "wscale": 7, "flags": ["timestamp", "sack-perm"]}}),
                ],
            ));
            commands.push(rule(
                "syn_proxy",
                vec![
                    ports,
                    json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}),
                    json!({"drop": null}),
                ],
            ));
        }
        self.batch(commands)
    }

    fn ban(&self, bans: &[(IpNet, Duration)]) -> Result<(), FirewallError> {
        self.apply(bans, &[])
    }

    fn unban(&self, nets: &[IpNet]) -> Result<(), FirewallError> {
        self.apply(&[], nets)
    }

    fn apply(&self, bans: &[(IpNet, Duration)], unban: &[IpNet]) -> Result<(), FirewallError> {
        let lifted_only = unban.iter().any(|n| !bans.iter().any(|(b, _)| b == n));
        let present = if lifted_only {
            self.list()?
        } else {
            BTreeSet::new()
        };
        let commands = self.changes(bans, unban, &present);
        if commands.is_empty() {
            return Ok(());
        }
        self.batch(commands)
    }

    fn list(&self) -> Result<BTreeSet<IpNet>, FirewallError> {
        let mut all = BTreeSet::new();
        for set in ["ban4", "ban6"] {
            all.extend(self.set_elements(set)?);
        }
        Ok(all)
    }

    fn teardown(&self) -> Result<(), FirewallError> {
        self.batch(vec![
            json!({"delete": {"table": {"family": "inet", "name": self.table}}}),
        ])
    }
}

/// The iptables + ipset implementation (for hosts without nftables).
#[derive(Debug, Clone)]
pub struct Iptables {
    netns: Option<String>,
    default_timeout: Duration,
    ports: Vec<u16>,
    tools: Tools,
}

const CHAIN: &str = "PALISADE";

impl Iptables {
    /// In the current network namespace; bans drop TCP to `ports`.
    pub fn new(default_timeout: Duration, ports: &[u16]) -> Self {
        Self {
            netns: None,
            default_timeout,
            ports: ports.to_vec(),
            tools: Tools::locate(),
        }
    }

    /// Runs these programs instead of the located ones.
    pub fn with_tools(mut self, tools: Tools) -> Self {
        self.tools = tools;
        self
    }

    fn run(&self, program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
        run(&self.tools.ip, self.netns.as_deref(), program, args, stdin)
    }

    /// Inside network namespace `ns`.
    pub fn in_netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_owned());
        self
    }

    /// Whether `iptables` and `ipset` can be run here.
    pub fn available(&self) -> bool {
        self.run(&self.tools.iptables, &["--version"], None).is_ok()
            && self.run(&self.tools.ipset, &["--version"], None).is_ok()
    }

    fn set_of(net: &IpNet) -> &'static str {
        match net {
            IpNet::V4(_) => "palisade4",
            IpNet::V6(_) => "palisade6",
        }
    }

    fn ipset_restore(&self, script: &str) -> Result<(), FirewallError> {
        self.run(&self.tools.ipset, &["restore", "-exist"], Some(script))
            .map(drop)
    }

    fn tables(&self) -> [(&Path, &'static str); 2] {
        [
            (&self.tools.iptables, "palisade4"),
            (&self.tools.ip6tables, "palisade6"),
        ]
    }
}

impl Firewall for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn setup(&self) -> Result<(), FirewallError> {
        if self.ports.is_empty() {
            return Err(FirewallError::NoPorts);
        }
        let t = self.default_timeout.as_secs().max(1);
        self.ipset_restore(&format!(
            "create palisade4 hash:net family inet timeout {t}\ncreate palisade6 hash:net family inet6 timeout {t}\n"
        ))?;
        // multiport takes at most 15 ports; one listener is the usual case.
        let ports: Vec<String> = self.ports.iter().take(15).map(u16::to_string).collect();
        let ports = ports.join(",");
        for (tool, set) in self.tables() {
            // Our chain, emptied, holding exactly one rule.
            if self.run(tool, &["-t", "raw", "-N", CHAIN], None).is_err() {
                self.run(tool, &["-t", "raw", "-F", CHAIN], None)?;
            }
            self.run(
                tool,
                &[
                    "-t",
                    "raw",
                    "-A",
                    CHAIN,
                    "-p",
                    "tcp",
                    "-m",
                    "multiport",
                    "--dports",
                    &ports,
                    "-m",
                    "set",
                    "--match-set",
                    set,
                    "src",
                    "-j",
                    "DROP",
                ],
                None,
            )?;
            if self
                .run(tool, &["-t", "raw", "-C", "PREROUTING", "-j", CHAIN], None)
                .is_err()
            {
                self.run(tool, &["-t", "raw", "-I", "PREROUTING", "-j", CHAIN], None)?;
            }
        }
        Ok(())
    }

    fn ban(&self, bans: &[(IpNet, Duration)]) -> Result<(), FirewallError> {
        self.apply(bans, &[])
    }

    fn unban(&self, nets: &[IpNet]) -> Result<(), FirewallError> {
        self.apply(&[], nets)
    }

    fn apply(&self, bans: &[(IpNet, Duration)], unban: &[IpNet]) -> Result<(), FirewallError> {
        if bans.is_empty() && unban.is_empty() {
            return Ok(());
        }
        // Lifts first, so a network in both is replaced.
        let mut script: String = unban
            .iter()
            .map(|n| format!("del {} {}\n", Self::set_of(n), n.trunc()))
            .collect();
        script.extend(bans.iter().map(|(n, ttl)| {
            format!(
                "add {} {} timeout {}\n",
                Self::set_of(n),
                n.trunc(),
                ttl.as_secs().max(1)
            )
        }));
        self.ipset_restore(&script)
    }

    fn list(&self) -> Result<BTreeSet<IpNet>, FirewallError> {
        let mut all = BTreeSet::new();
        for (_, set) in self.tables() {
            let out = self.run(&self.tools.ipset, &["save", set], None)?;
            for line in out.lines() {
                let mut f = line.split_whitespace();
                if f.next() != Some("add") {
                    continue;
                }
                let value = f.nth(1).unwrap_or_default();
                let net = value
                    .parse::<IpNet>()
                    .or_else(|_| value.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| FirewallError::Output {
                        tool: "ipset save".into(),
                        why: format!("line {line:?}"),
                    })?;
                all.insert(net);
            }
        }
        Ok(all)
    }

    fn teardown(&self) -> Result<(), FirewallError> {
        for (tool, _) in self.tables() {
            let _ = self.run(tool, &["-t", "raw", "-D", "PREROUTING", "-j", CHAIN], None);
            let _ = self.run(tool, &["-t", "raw", "-F", CHAIN], None);
            let _ = self.run(tool, &["-t", "raw", "-X", CHAIN], None);
        }
        self.ipset_restore("destroy palisade4\ndestroy palisade6\n")
    }
}

/// Changes nothing; remembers what it would have done.
#[derive(Debug, Default)]
pub struct DryRun {
    banned: Mutex<BTreeSet<IpNet>>,
}

impl Firewall for DryRun {
    fn name(&self) -> &'static str {
        "dry-run"
    }

    fn setup(&self) -> Result<(), FirewallError> {
        Ok(())
    }

    fn ban(&self, bans: &[(IpNet, Duration)]) -> Result<(), FirewallError> {
        let mut b = self
            .banned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        b.extend(bans.iter().map(|(n, _)| n.trunc()));
        Ok(())
    }

    fn unban(&self, nets: &[IpNet]) -> Result<(), FirewallError> {
        let mut b = self
            .banned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for n in nets {
            b.remove(&n.trunc());
        }
        Ok(())
    }

    fn list(&self) -> Result<BTreeSet<IpNet>, FirewallError> {
        Ok(self
            .banned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone())
    }

    fn teardown(&self) -> Result<(), FirewallError> {
        self.banned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_replaced_ban_is_deleted_and_added_again_in_one_batch() {
        // Kernels before 6.10 keep an element's old timeout when it is
        // added again; the namespace test runs on whatever kernel CI has.
        let fw = Nftables::new(Duration::from_secs(600), &[80]);
        let again: IpNet = "192.0.2.1/32".parse().unwrap();
        let new: IpNet = "192.0.2.2/32".parse().unwrap();
        let gone: IpNet = "2001:db8::/64".parse().unwrap();
        let absent: IpNet = "2001:db8:1::/64".parse().unwrap();
        let ttl = Duration::from_secs(7200);
        let batch = fw.changes(
            &[(again, ttl), (new, ttl)],
            &[again, gone, absent],
            &BTreeSet::from([gone]),
        );
        let shape: Vec<(&str, &str, Vec<Value>)> = batch
            .iter()
            .map(|c| {
                let (verb, body) = c.as_object().unwrap().iter().next().unwrap();
                let e = &body["element"];
                (
                    verb.as_str(),
                    e["name"].as_str().unwrap(),
                    e["elem"].as_array().unwrap().clone(),
                )
            })
            .collect();
        let timed = |a: &str, t: u64| json!({"elem": {"val": a, "timeout": t}});
        assert_eq!(
            shape,
            vec![
                ("add", "ban4", vec![timed("192.0.2.1", 1)]),
                ("delete", "ban4", vec![json!("192.0.2.1")]),
                (
                    "add",
                    "ban4",
                    vec![timed("192.0.2.1", 7200), timed("192.0.2.2", 7200)]
                ),
                (
                    "delete",
                    "ban6",
                    vec![json!({"prefix": {"addr": "2001:db8::", "len": 64}})]
                ),
            ]
        );
    }
}
