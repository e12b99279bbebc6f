//! Network namespaces for tests and tools: create one, run code inside
//! it, delete it when done (also when the code panics).

use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`ip netns`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `pal-<tag>-<pid>-<n>`: unique, so tests can run in parallel.
    /// `None` without the privilege to do so.
    pub fn create(tag: &str) -> Option<Self> {
        let name = format!(
            "pal-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self { name })
    }

    /// For tests: a namespace, or `None` after printing why (no root).
    /// Where `CI` is set, a missing privilege is a failure instead: CI runs
    /// as root, so every kernel test must really run there.
    pub fn for_test(tag: &str) -> Option<Self> {
        let ns = Self::create(tag);
        if ns.is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "cannot create a network namespace in CI (needs root)"
            );
            eprintln!("skipped: cannot create a network namespace (needs root and iproute2)");
        }
        ns
    }

    /// Joins this namespace to `other` with a veth pair: `v0` here with
    /// `local` (CIDR), `v1` there with every address of `remote`; both
    /// ends and both loopbacks up.
    pub fn link(&self, other: &Netns, local: &str, remote: &[&str]) -> Result<(), String> {
        self.run(&[
            "ip",
            "link",
            "add",
            "v0",
            "type",
            "veth",
            "peer",
            "name",
            "v1",
            "netns",
            other.name(),
        ])?;
        self.run(&["ip", "addr", "add", local, "dev", "v0"])?;
        for r in remote {
            other.run(&["ip", "addr", "add", r, "dev", "v1"])?;
        }
        for (ns, dev) in [(self, "v0"), (other, "v1")] {
            ns.run(&["ip", "link", "set", dev, "up"])?;
            ns.run(&["ip", "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a program inside (argument vector, no shell).
    pub fn exec(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
    }

    /// Like [`Self::exec`], failing with the program's stderr.
    pub fn run(&self, args: &[&str]) -> Result<(), String> {
        let out = self.exec(args).map_err(|e| format!("{args:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it
    /// opens live there.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}
