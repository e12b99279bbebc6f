//! Palisade's protection algorithms: pure, clock-injected, bounded.
//!
//! - [`rate`]: per-client limiter (token bucket + approximate 1 s window).
//! - [`reputation`]: scores, penalties, recovery and explanations.
//! - [`record`], [`clients`]: the 32-byte client record and the bounded
//!   table of them that the limiter and reputation keep clients in;
//!   [`notes`]: the side table of events behind scores.
//! - [`table`]: the bucket table the adaptive breaker and the connection
//!   guard still use.
//! - [`shield`]: the decision pipeline the proxy runs per request.
//!
//! ```
//! use palisade_core::{ClientKey, ManualClock, Clock};
//! use palisade_limits::rate::{Quota, RateLimiter};
//! use std::num::NonZeroU32;
//!
//! let limiter = RateLimiter::new(Quota::per_second(NonZeroU32::new(2).unwrap()), 1000);
//! let clock = ManualClock::new();
//! let client = ClientKey::V4(0x7f00_0001);
//! assert!(limiter.check(&client, clock.now()).is_ok());
//! assert!(limiter.check(&client, clock.now()).is_ok());
//! let refused = limiter.check(&client, clock.now()).unwrap_err();
//! assert_eq!(refused.retry_after_secs(), 1);
//! ```

pub mod adaptive;
pub mod admission;
pub mod breaker;
pub mod clients;
pub mod notes;
pub mod rate;
pub mod record;
pub mod reputation;
pub mod shield;
pub mod table;
