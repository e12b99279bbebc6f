//! Gives the heap a burst left behind back to the kernel. glibc's malloc
//! keeps what it freed in per-thread arenas and only returns the top of
//! the main one: after a flood of a few hundred connections the daemon
//! stayed some 30 MB above its baseline for good (what `palisade drill`
//! measured after `http-flood-many`), though nothing leaked. Once the
//! open connections fall to half of their peak since the last trim, the
//! freed pages are handed back with `malloc_trim`; a steady load never
//! halves, so it never pays for re-faulting them.

use std::sync::Arc;
use std::time::Duration;

use palisade_proxy::proxy::App;

/// Peaks below this are the daemon's ordinary life, not a burst.
const BURST: i64 = 64;

/// Open connections, read once a second, and when to trim.
#[derive(Debug, Default)]
struct Peak {
    high: i64,
}

impl Peak {
    /// Whether to trim now, with `open` connections open.
    fn observe(&mut self, open: i64) -> bool {
        self.high = self.high.max(open);
        let trim = self.high >= BURST && open <= self.high / 2;
        if trim {
            self.high = open;
        }
        trim
    }
}

/// Watches `app`'s open connections and trims after each burst.
pub fn spawn(app: Arc<App>) {
    tokio::spawn(async move {
        let mut peak = Peak::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if peak.observe(app.metrics.connections_open.get()) {
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim has no preconditions; it only takes malloc's
    // own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators give memory back on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_trimmed_once_it_halves_and_a_steady_load_never() {
        let mut p = Peak::default();
        // Ordinary life: small, jittery.
        assert!(![5, 30, 2, 40, 1].into_iter().any(|n| p.observe(n)));
        // A flood, and its end.
        assert!(![200, 600, 400].into_iter().any(|n| p.observe(n)));
        assert!(p.observe(30));
        // Once: the next peak starts from where it ended.
        assert!(!p.observe(20));
        // A large steady load that swings by a third never trims.
        assert!(![3000, 2200, 3100, 2400, 2900].into_iter().any(|n| p.observe(n)));
        assert!(p.observe(1500));
    }
}
