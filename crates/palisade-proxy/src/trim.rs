//! Gives memory a burst freed back to the kernel. glibc keeps what a
//! burst of connections freed in its arenas, fragmented, and hands little
//! of it back on its own: after 1000 slowloris connections were cut, the
//! daemon stayed 25 MiB above its baseline for good. Every few seconds,
//! when the allocator holds more than [`SLACK`] free, `malloc_trim`
//! returns the free pages.

use std::time::Duration;

use tokio::sync::watch;

/// How often the allocator's free memory is looked at.
const EVERY: Duration = Duration::from_secs(5);

/// Free memory the allocator may keep for the next burst.
const SLACK: usize = 16 << 20;

/// Trims every [`EVERY`] when there is more than [`SLACK`] to give back,
/// until `stop`.
pub async fn run(mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
        // Trimming walks the arenas under their locks: off the workers.
        let _ = tokio::task::spawn_blocking(trim_if_slack).await;
    }
}

/// Trims if the allocator holds more than [`SLACK`] free; whether it did.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim_if_slack() -> bool {
    // SAFETY: mallinfo2 has no preconditions; it only reads the allocator's
    // statistics.
    let free = unsafe { libc::mallinfo2() }.fordblks;
    if free <= SLACK {
        return false;
    }
    // SAFETY: malloc_trim has no preconditions; 0 keeps no extra padding.
    unsafe { libc::malloc_trim(0) };
    true
}

/// Other allocators (musl's, say) give memory back on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_if_slack() -> bool {
    false
}
