//! The vocabulary every Palisade crate shares. No I/O lives here.
//!
//! - [`Clock`]: injected time, so limiter, reputation and breaker logic is
//!   tested deterministically with a [`ManualClock`].
//! - [`ClientKey`]: who a request is charged to (IPv4 address, IPv6 prefix,
//!   or a fingerprint of address and User-Agent).
//! - [`TrustedProxies`]: the only way a forwarding header can change the
//!   client address.
//! - [`ja4`]: TLS client fingerprints from the raw ClientHello.
//! - [`Mode`] and [`RejectReason`]: what a control decided.
//!
//! ```
//! use palisade_core::{ClientKey, Clock, ManualClock};
//! use std::time::Duration;
//!
//! let clock = ManualClock::new();
//! clock.advance(Duration::from_millis(250));
//! assert_eq!(clock.now(), 250_000_000);
//!
//! let a = ClientKey::from_ip("2001:db8::1".parse().unwrap(), 64);
//! let b = ClientKey::from_ip("2001:db8::ffff".parse().unwrap(), 64);
//! assert_eq!(a, b, "one /64 is one client");
//! ```

mod clock;
mod forwarded;
mod host;
pub mod ja4;
mod key;
mod path;
pub mod proxy_protocol;
mod verdict;

pub use clock::{
    Clock, ManualClock, MonotonicClock, NANOS_PER_MS, NANOS_PER_SEC, Nanos, unix_now, unix_now_ms,
};
pub use forwarded::{ClientIpHeader, TrustedProxies};
pub use host::{HostError, normalize_host};
pub use key::ClientKey;
pub use path::{PathError, normalize_path, route_path};
pub use verdict::{Mode, RejectReason};
