//! The daemon's clock reads tokio's time, so a test that pauses tokio's
//! time moves every decision the daemon takes on time with it (rate
//! windows, breaker open periods, penalties), not only its timers. Outside
//! tests tokio's `Instant` is the system's monotonic clock.

use palisade_core::{Clock, Nanos};
use tokio::time::Instant;

/// Nanoseconds since the daemon started, on tokio's clock.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: Instant,
}

impl TokioClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Nanos {
        // u64 nanoseconds last 584 years of uptime; saturate rather than wrap.
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}
