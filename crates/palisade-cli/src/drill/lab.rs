//! The drill's network: three namespaces of its own (client, server,
//! upstream) joined by veth pairs, addresses only from 198.18.0.0/15 (the
//! benchmarking range, routed nowhere). Everything it makes lives inside
//! those namespaces, so deleting them removes it all; [`Lab`]'s `Drop`
//! does, and the signal flag turns Ctrl-C into an ordinary return that
//! runs it.
//!
//! ```text
//!  client ns                     server ns                      upstream ns
//!  pd-c 198.18.0.2/24  <----->  pd-s  198.18.0.1/24  Palisade
//!  local 198.18.128.0/17 (lo)    pd-su 198.18.2.1/24  <------>  pd-u 198.18.2.2/24  demo upstream
//! ```
//!
//! The client side owns 198.18.128.0/17 as a local route on `lo` (the
//! "AnyIP" trick): any of its 32 768 addresses can be bound without adding
//! it, which is how one machine becomes thousands of clients.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};

/// Every name the drill gives a namespace starts with this, then the pid.
pub const PREFIX: &str = "palisade-drill-";

/// Palisade's address, as clients see it.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The client namespace's own address on its veth.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The server namespace's address towards the upstream.
pub const SERVER_UPSTREAM_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// The demo upstream's address.
pub const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// The first address of the client side's bindable range (a /17).
pub const BINDABLE: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 0);
/// How many addresses the bindable range holds.
pub const BINDABLE_LEN: u32 = 1 << 15;
/// The client namespace's veth.
pub const CLIENT_IF: &str = "pd-c";

/// Set by SIGINT, SIGTERM and SIGHUP: the drill stops at the next check
/// and cleans up on the way out.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into [`stopped`] instead of death, so
/// that every guard's `Drop` runs.
pub fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; the cast is how libc takes a handler.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Whether a signal asked the drill to stop.
pub fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// CPU priority of what the drill measures: Palisade, the demo upstream,
/// the legitimate population and the monitor. A little above the rest of
/// the machine, so that a build running next to the drill does not look
/// like an attack that got through.
pub const MEASURED_NICE: libc::c_int = -5;
/// CPU priority of the attackers: well below what they attack (in life
/// they are on machines of their own).
pub const ATTACKER_NICE: libc::c_int = 5;

/// Sets the calling thread's nice value (on Linux a thread's own; threads
/// it starts, and programs it execs, inherit it). Async-signal-safe.
pub fn set_nice(nice: libc::c_int) {
    // SAFETY: setpriority has no memory preconditions; `who` 0 is the
    // calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, nice);
    }
}

/// The three namespaces, deleted (with everything in them) on drop.
#[derive(Debug)]
pub struct Lab {
    /// Attackers and the legitimate population.
    pub client: String,
    /// Palisade.
    pub server: String,
    /// The demo upstream.
    pub upstream: String,
    made: Vec<String>,
}

impl Lab {
    /// The namespace names this run would use (for the plan, before any
    /// is made): `palisade-drill-PID-RAND-{client,server,upstream}`.
    pub fn names() -> anyhow::Result<[String; 3]> {
        let base = format!("{PREFIX}{}-{}", std::process::id(), random_hex(4)?);
        Ok(["client", "server", "upstream"].map(|role| format!("{base}-{role}")))
    }

    /// Makes the namespaces, links and routes. On error, whatever was
    /// made is deleted before returning.
    pub fn create(names: [String; 3]) -> anyhow::Result<Self> {
        let [client, server, upstream] = names;
        let mut lab = Self {
            client,
            server,
            upstream,
            made: Vec::new(),
        };
        for ns in [lab.client.clone(), lab.server.clone(), lab.upstream.clone()] {
            ip(&["netns", "add", &ns])?;
            lab.made.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (c, s, u) = (&lab.client, &lab.server, &lab.upstream);
        ip(&[
            "-n", c, "link", "add", CLIENT_IF, "type", "veth", "peer", "name", "pd-s", "netns", s,
        ])?;
        ip(&[
            "-n", u, "link", "add", "pd-u", "type", "veth", "peer", "name", "pd-su", "netns", s,
        ])?;
        let client = format!("{CLIENT}/24");
        let server = format!("{SERVER}/24");
        let server_up = format!("{SERVER_UPSTREAM_SIDE}/24");
        let upstream = format!("{UPSTREAM}/24");
        for (ns, dev, addr) in [
            (c, CLIENT_IF, client.as_str()),
            (s, "pd-s", server.as_str()),
            (s, "pd-su", server_up.as_str()),
            (u, "pd-u", upstream.as_str()),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        let bindable = format!("{BINDABLE}/17");
        ip(&["-n", c, "route", "add", "local", &bindable, "dev", "lo"])?;
        // Everything in the benchmarking range (spoofed sources included)
        // is answered towards the client side, as the internet would be.
        ip(&[
            "-n",
            s,
            "route",
            "add",
            "198.18.0.0/15",
            "via",
            &CLIENT.to_string(),
        ])?;
        // Thousands of clients from one namespace: room for their ports
        // and their half-open and TIME-WAIT sockets.
        sysctl(c, "net.ipv4.ip_local_port_range", "1024 65000")?;
        Ok(lab)
    }

    /// Moves the calling thread into `ns`: sockets it opens from then on
    /// live there, and so do threads it starts.
    pub fn enter(ns: &str) -> anyhow::Result<()> {
        let path = format!("/run/netns/{ns}");
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on a namespace fd we hold open affects only this
        // thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!(
                "entering network namespace {ns}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.made.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

/// Deletes namespaces left by drills whose process is gone (killed with
/// SIGKILL, say, when no `Drop` could run). Their names carry the pid.
pub fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2 is needed)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            "echo \"$1\" > \"$2\"",
            "sh",
            value,
            &path,
        ])
        .output()
        .context("running ip netns exec")?;
    if !out.status.success() {
        bail!(
            "{key} = {value} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `n` random bytes from /dev/urandom, in hex.
pub fn random_hex(n: usize) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The `i`th address of the bindable range.
pub fn bindable(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(BINDABLE) + (i % BINDABLE_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindable_addresses_stay_in_their_range() {
        assert_eq!(bindable(1), Ipv4Addr::new(198, 18, 128, 1));
        assert_eq!(bindable(BINDABLE_LEN - 1), Ipv4Addr::new(198, 18, 255, 255));
        assert_eq!(bindable(BINDABLE_LEN), BINDABLE);
    }

    #[test]
    fn names_carry_the_prefix_and_pid_and_differ_by_role() {
        let names = Lab::names().unwrap();
        let pid = format!("{PREFIX}{}-", std::process::id());
        assert!(names.iter().all(|n| n.starts_with(&pid)), "{names:?}");
        assert!(names[0].ends_with("-client") && names[1].ends_with("-server"));
    }
}
