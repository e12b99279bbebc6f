//! Connection admission at `accept()`, before a byte is read.
//!
//! Four bounds: open connections overall and per client address (IPv6 by
//! prefix), and new connections per second per address and overall. An
//! admitted connection carries a [`Permit`]; dropping it (the connection
//! ends) gives the slots back, so a count can never leak. A fifth bound,
//! requests in flight per address over all its connections, is taken per
//! request with [`Permit::begin_request`].

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use palisade_core::{ClientKey, Nanos};

use crate::rate::{Quota, RateState};
use crate::table::{ClientTable, Slot, Zeroable};

/// Bounds. Defaults are the documented ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Open connections overall.
    pub max_connections: u32,
    /// Open connections per client address.
    pub max_per_ip: u32,
    /// New connections per second per client address.
    pub new_per_ip_per_second: Option<NonZeroU32>,
    /// New connections per second overall.
    pub new_per_second: Option<NonZeroU32>,
    /// Requests in flight per client address, all its connections together.
    pub max_in_flight_per_ip: u32,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_per_ip: 100,
            new_per_ip_per_second: NonZeroU32::new(50),
            new_per_second: None,
            max_in_flight_per_ip: 100,
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `max_connections` reached.
    TooManyConnections,
    /// `max_per_ip` reached for this address.
    TooManyFromAddress,
    /// `new_per_ip_per_second` exceeded for this address.
    AddressRate,
    /// `new_per_second` exceeded.
    GlobalRate,
    /// The address is on the deny list.
    Denylisted,
    /// `max_in_flight_per_ip` requests of this address are in flight.
    TooManyInFlight,
}

impl Refusal {
    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooManyConnections => "max_connections",
            Self::TooManyFromAddress => "max_per_ip",
            Self::AddressRate => "per_ip_rate",
            Self::GlobalRate => "global_rate",
            Self::Denylisted => "denylisted",
            Self::TooManyInFlight => "max_in_flight_per_ip",
        }
    }
}

/// One address's open connections and connection rate.
#[derive(Default)]
#[repr(C)]
pub struct AddressState {
    open: AtomicU32,
    in_flight: AtomicU32,
    rate: RateState,
}

// SAFETY: only atomic integers, whose zero is their default.
unsafe impl Zeroable for AddressState {}

impl Slot for AddressState {
    fn is_idle(&self, now: Nanos) -> bool {
        self.open.load(Ordering::Acquire) == 0 && self.rate.is_idle(now)
    }

    fn reset(&self) {
        self.open.store(0, Ordering::Release);
        self.in_flight.store(0, Ordering::Release);
        self.rate.reset();
    }
}

/// The admission guard, shared by the accept loop and every permit.
/// Bounds live in atomics so a reload changes them without dropping counts.
pub struct Admission {
    max_connections: AtomicU32,
    max_per_ip: AtomicU32,
    new_per_ip: AtomicU32,
    new_global: AtomicU32,
    max_in_flight_per_ip: AtomicU32,
    ipv6_prefix: u8,
    open: AtomicU32,
    global_rate: RateState,
    addresses: ClientTable<AddressState>,
}

/// Holds a connection's place; dropping it releases the place.
pub struct Permit {
    admission: Arc<Admission>,
    key: ClientKey,
    per_address: bool,
}

impl Permit {
    /// Takes a place for one request of this connection's address, unless
    /// `max_in_flight_per_ip` of its requests (over all its connections)
    /// are in flight. Trusted proxies are not bounded. The place is given
    /// back when the returned guard drops.
    pub fn begin_request(self: &Arc<Self>) -> Result<RequestPermit, Refusal> {
        let a = &self.admission;
        let max = if self.per_address {
            a.max_in_flight_per_ip.load(Ordering::Acquire)
        } else {
            u32::MAX
        };
        // The address has an open connection (this one), so it is where
        // `admit` counted it.
        let admitted = a.addresses.get_or_overflow(&self.key, |s| {
            if s.in_flight.fetch_add(1, Ordering::AcqRel) >= max {
                s.in_flight.fetch_sub(1, Ordering::AcqRel);
                return false;
            }
            true
        });
        if admitted {
            Ok(RequestPermit(self.clone()))
        } else {
            Err(Refusal::TooManyInFlight)
        }
    }
}

/// One request's place under `max_in_flight_per_ip`.
pub struct RequestPermit(Arc<Permit>);

impl Drop for RequestPermit {
    fn drop(&mut self) {
        let p = &self.0;
        p.admission.addresses.get_or_overflow(&p.key, |s| {
            let _ = s
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        });
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // An address with open connections is never forgotten, so it is
        // where `admit` counted it: its own slot, or the shared overflow.
        self.admission.addresses.get_or_overflow(&self.key, |s| {
            let _ = s
                .open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        });
        self.admission.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// A guard tracking at most `max_addresses` client addresses.
    pub fn new(cfg: AdmissionConfig, ipv6_prefix: u8, max_addresses: usize) -> Self {
        let g = Self {
            max_connections: AtomicU32::new(0),
            max_per_ip: AtomicU32::new(0),
            new_per_ip: AtomicU32::new(0),
            new_global: AtomicU32::new(0),
            max_in_flight_per_ip: AtomicU32::new(0),
            ipv6_prefix,
            open: AtomicU32::new(0),
            global_rate: RateState::default(),
            addresses: ClientTable::new(max_addresses),
        };
        g.reconfigure(&cfg);
        g
    }

    /// New bounds (live reload); open connections keep their places.
    pub fn reconfigure(&self, cfg: &AdmissionConfig) {
        self.max_connections.store(cfg.max_connections, Ordering::Release);
        self.max_per_ip.store(cfg.max_per_ip, Ordering::Release);
        let rate = |r: Option<NonZeroU32>| r.map_or(0, NonZeroU32::get);
        self.new_per_ip
            .store(rate(cfg.new_per_ip_per_second), Ordering::Release);
        self.new_global.store(rate(cfg.new_per_second), Ordering::Release);
        self.max_in_flight_per_ip
            .store(cfg.max_in_flight_per_ip, Ordering::Release);
    }

    /// Open connections now.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    /// The address table (for gauges).
    pub fn addresses(&self) -> &ClientTable<AddressState> {
        &self.addresses
    }

    /// Admits or refuses a new connection from `ip` at `now`.
    /// With `per_address` false (a trusted proxy speaking for many
    /// clients), only the overall bounds apply.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, per_address: bool, now: Nanos) -> Result<Permit, Refusal> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_connections.load(Ordering::Acquire) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::TooManyConnections);
        }
        if let Some(rate) = NonZeroU32::new(self.new_global.load(Ordering::Acquire))
            && self.global_rate.check(&Quota::per_second(rate), now).is_err()
        {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::GlobalRate);
        }
        let key = ClientKey::from_ip(ip.to_canonical(), self.ipv6_prefix);
        let per_ip_rate = NonZeroU32::new(self.new_per_ip.load(Ordering::Acquire)).filter(|_| per_address);
        let max_per_ip = if per_address {
            self.max_per_ip.load(Ordering::Acquire)
        } else {
            u32::MAX
        };
        let verdict = self.addresses.with(&key, now, |s| {
            if let Some(rate) = per_ip_rate
                && s.rate.check(&Quota::per_second(rate), now).is_err()
            {
                return Err(Refusal::AddressRate);
            }
            if s.open.fetch_add(1, Ordering::AcqRel) >= max_per_ip {
                s.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::TooManyFromAddress);
            }
            Ok(())
        });
        match verdict {
            Ok(()) => Ok(Permit {
                admission: self.clone(),
                key,
                per_address,
            }),
            Err(refusal) => {
                self.open.fetch_sub(1, Ordering::AcqRel);
                Err(refusal)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_core::{NANOS_PER_MS, NANOS_PER_SEC};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn guard(cfg: AdmissionConfig) -> Arc<Admission> {
        Arc::new(Admission::new(cfg, 64, 1000))
    }

    trait AdmitIp {
        fn admit_ip(&self, ip: IpAddr, now: Nanos) -> Result<Permit, Refusal>;
    }

    impl AdmitIp for Arc<Admission> {
        fn admit_ip(&self, ip: IpAddr, now: Nanos) -> Result<Permit, Refusal> {
            self.admit(ip, true, now)
        }
    }

    #[test]
    fn requests_in_flight_are_bounded_per_address_over_all_its_connections() {
        let g = guard(AdmissionConfig {
            max_in_flight_per_ip: 3,
            ..Default::default()
        });
        let a = Arc::new(g.admit_ip(ip("10.0.0.7"), 0).unwrap());
        let b = Arc::new(g.admit_ip(ip("10.0.0.7"), 0).unwrap());
        let mut held = vec![a.begin_request().unwrap(), a.begin_request().unwrap()];
        held.push(b.begin_request().unwrap());
        assert_eq!(b.begin_request().err(), Some(Refusal::TooManyInFlight));
        assert_eq!(a.begin_request().err(), Some(Refusal::TooManyInFlight));
        // Another address is not affected; a finished request frees a place.
        let c = Arc::new(g.admit_ip(ip("10.0.0.8"), 0).unwrap());
        assert!(c.begin_request().is_ok());
        held.pop();
        assert!(a.begin_request().is_ok());
        // A trusted proxy speaks for many clients: not bounded here.
        let proxy = Arc::new(g.admit(ip("10.0.0.9"), false, 0).unwrap());
        let many: Vec<_> = (0..10).filter_map(|_| proxy.begin_request().ok()).collect();
        assert_eq!(many.len(), 10);
    }

    #[test]
    fn trusted_proxies_skip_per_address_bounds_and_reload_changes_bounds() {
        let g = guard(AdmissionConfig {
            max_per_ip: 1,
            ..Default::default()
        });
        let held: Vec<_> = (0..60)
            .filter_map(|_| g.admit(ip("10.0.0.9"), false, 0).ok())
            .collect();
        assert_eq!(held.len(), 60);
        g.reconfigure(&AdmissionConfig {
            max_connections: 60,
            ..Default::default()
        });
        assert_eq!(
            g.admit(ip("10.0.0.10"), true, 0).err(),
            Some(Refusal::TooManyConnections)
        );
    }

    #[test]
    fn fifty_new_connections_per_second_per_address() {
        let g = guard(AdmissionConfig::default());
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..300 {
            match g.admit_ip(ip("10.0.0.1"), 0) {
                Ok(p) => held.push(p),
                Err(r) => {
                    assert_eq!(r, Refusal::AddressRate);
                    refused += 1;
                }
            }
        }
        assert_eq!((held.len(), refused), (50, 250));
        // Another address is untouched.
        assert!(g.admit_ip(ip("10.0.0.2"), 0).is_ok());
        // One second later the address may connect again.
        assert!(g.admit_ip(ip("10.0.0.1"), NANOS_PER_SEC).is_ok());
    }

    #[test]
    fn open_connections_per_address_and_overall() {
        let g = guard(AdmissionConfig {
            max_connections: 5,
            max_per_ip: 3,
            new_per_ip_per_second: None,
            new_per_second: None,
            max_in_flight_per_ip: 100,
        });
        let a: Vec<_> = (0..3).map(|_| g.admit_ip(ip("10.0.0.1"), 0).unwrap()).collect();
        assert_eq!(
            g.admit_ip(ip("10.0.0.1"), 0).err(),
            Some(Refusal::TooManyFromAddress)
        );
        let b: Vec<_> = (0..2).map(|_| g.admit_ip(ip("10.0.0.2"), 0).unwrap()).collect();
        assert_eq!(
            g.admit_ip(ip("10.0.0.3"), 0).err(),
            Some(Refusal::TooManyConnections)
        );
        assert_eq!(g.open(), 5);
        // Closing gives the places back.
        drop(a);
        assert_eq!(g.open(), 2);
        assert!(g.admit_ip(ip("10.0.0.1"), 0).is_ok());
        drop(b);
        assert_eq!(g.open(), 0);
    }

    #[test]
    fn ipv6_addresses_share_their_prefix() {
        let g = guard(AdmissionConfig {
            max_per_ip: 2,
            new_per_ip_per_second: None,
            ..Default::default()
        });
        let _a = g.admit_ip(ip("2001:db8::1"), 0).unwrap();
        let _b = g.admit_ip(ip("2001:db8::2"), 0).unwrap();
        assert_eq!(
            g.admit_ip(ip("2001:db8::3"), 0).err(),
            Some(Refusal::TooManyFromAddress)
        );
        assert!(g.admit_ip(ip("2001:db8:0:1::1"), 0).is_ok());
    }

    #[test]
    fn permits_release_overflowed_addresses_too() {
        // One tracked address: the second one overflows, and must get its
        // place back on close like any other.
        let g = Arc::new(Admission::new(
            AdmissionConfig {
                max_per_ip: 1,
                new_per_ip_per_second: None,
                ..Default::default()
            },
            64,
            1,
        ));
        let _a = g.admit_ip(ip("10.0.0.1"), 0).unwrap();
        let b = g.admit_ip(ip("10.0.0.2"), 0).unwrap();
        assert_eq!(g.addresses().overflowed(), 1);
        drop(b);
        assert!(g.admit_ip(ip("10.0.0.2"), 0).is_ok());
    }

    #[test]
    fn global_rate() {
        let g = guard(AdmissionConfig {
            new_per_second: NonZeroU32::new(10),
            new_per_ip_per_second: None,
            ..Default::default()
        });
        let held: Vec<_> = (0..50u8)
            .filter_map(|i| g.admit_ip(IpAddr::from([10, 0, 1, i]), 5 * NANOS_PER_MS).ok())
            .collect();
        assert_eq!(held.len(), 10);
        assert_eq!(g.open(), 10);
    }
}
