//! SYN cookies: the server's initial sequence number encodes
//! the connection so that no state is kept until the client's ACK proves
//! it received our SYN-ACK.
//!
//! ```text
//! cookie (32 bits) = slot mod 32 (5) | MSS index (3) | MAC (24)
//! MAC = SipHash-1-3(key; source, destination, ports, client ISN, slot, MSS index)
//! ```
//!
//! A slot is 64 seconds; a cookie is accepted in its slot and the next one
//! (64–128 s). Forging one means guessing 24 bits of a keyed MAC per try
//! (the key never leaves the process). The MSS index picks from
//! [`MSS_TABLE`], so the handshake keeps a usable segment size.

use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};

use siphasher::sip::SipHasher13;

/// MSS values a cookie can carry: the largest not above the client's MSS
/// is used.
pub const MSS_TABLE: [u16; 8] = [536, 1220, 1300, 1360, 1400, 1440, 1460, 8960];

/// Seconds per time slot.
pub const SLOT_SECS: u64 = 64;

const MAC_BITS: u32 = 24;
const MAC_MASK: u32 = (1 << MAC_BITS) - 1;

/// The four-tuple of a connection, as the client sent its SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Client address and port.
    pub client: SocketAddr,
    /// Our address and port.
    pub server: SocketAddr,
}

/// A keyed SYN-cookie generator and checker.
#[derive(Clone)]
pub struct SynCookies {
    key: [u8; 16],
    /// Slots after its own during which a cookie is still accepted.
    max_age: u64,
}

impl std::fmt::Debug for SynCookies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynCookies")
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl SynCookies {
    /// With a secret key (random per process, or shared by the nodes that
    /// may see the returning ACK).
    pub fn new(key: [u8; 16]) -> Self {
        Self { key, max_age: 1 }
    }

    fn mac(&self, flow: &Flow, client_isn: u32, slot: u64, mss_index: u32) -> u32 {
        let mut h = SipHasher13::new_with_key(&self.key);
        for addr in [flow.client, flow.server] {
            match addr.ip().to_canonical() {
                IpAddr::V4(a) => h.write(&a.octets()),
                IpAddr::V6(a) => h.write(&a.octets()),
            }
            h.write_u16(addr.port());
        }
        h.write_u32(client_isn);
        h.write_u64(slot);
        h.write_u32(mss_index);
        (h.finish() as u32) & MAC_MASK
    }

    /// The cookie to send as our ISN in the SYN-ACK.
    pub fn generate(&self, flow: &Flow, client_isn: u32, client_mss: u16, now_secs: u64) -> u32 {
        let slot = now_secs / SLOT_SECS;
        let mss_index = MSS_TABLE.iter().rposition(|&m| m <= client_mss).unwrap_or(0) as u32;
        ((slot as u32 & 0x1f) << 27) | (mss_index << MAC_BITS) | self.mac(flow, client_isn, slot, mss_index)
    }

    /// Checks the client's ACK: `ack` is its acknowledgement number (our
    /// cookie + 1), `seq` its sequence number (its ISN + 1). Returns the
    /// MSS to use, or `None` for an invalid or expired cookie.
    pub fn check(&self, flow: &Flow, seq: u32, ack: u32, now_secs: u64) -> Option<u16> {
        let cookie = ack.wrapping_sub(1);
        let client_isn = seq.wrapping_sub(1);
        let now_slot = now_secs / SLOT_SECS;
        let stamp = u64::from(cookie >> 27);
        let mss_index = (cookie >> MAC_BITS) & 0x7;
        // The one slot within the accepted age with these low 5 bits.
        let age = (now_slot.wrapping_sub(stamp)) & 0x1f;
        if age > self.max_age {
            return None;
        }
        let slot = now_slot.checked_sub(age)?;
        (self.mac(flow, client_isn, slot, mss_index) == cookie & MAC_MASK)
            .then(|| MSS_TABLE[mss_index as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flow(a: [u8; 4], sport: u16) -> Flow {
        Flow {
            client: SocketAddr::from((a, sport)),
            server: SocketAddr::from(([198, 18, 0, 1], 8080)),
        }
    }

    const KEY: [u8; 16] = *b"0123456789abcdef";

    #[test]
    fn a_cookie_round_trips_with_its_mss() {
        let c = SynCookies::new(KEY);
        let f = flow([198, 18, 0, 2], 40000);
        for (client_mss, expect) in [
            (1460, 1460),
            (1500, 1460),
            (536, 536),
            (1000, 536),
            (9000, 8960),
            (100, 536),
        ] {
            let cookie = c.generate(&f, 777, client_mss, 1_000);
            assert_eq!(
                c.check(&f, 778, cookie.wrapping_add(1), 1_000),
                Some(expect),
                "mss {client_mss}"
            );
        }
    }

    #[test]
    fn cookies_expire_after_the_next_slot() {
        let c = SynCookies::new(KEY);
        let f = flow([198, 18, 0, 2], 40000);
        let t = 10 * SLOT_SECS + 5;
        let cookie = c.generate(&f, 1, 1460, t);
        assert!(
            c.check(&f, 2, cookie + 1, t + SLOT_SECS).is_some(),
            "next slot still valid"
        );
        assert!(
            c.check(&f, 2, cookie + 1, t + 2 * SLOT_SECS).is_none(),
            "two slots later: expired"
        );
        assert!(
            c.check(&f, 2, cookie + 1, t + 32 * SLOT_SECS).is_none(),
            "the 5-bit stamp wraps: still expired"
        );
        assert!(
            c.check(&f, 2, cookie + 1, t - SLOT_SECS).is_none(),
            "from the future"
        );
    }

    #[test]
    fn any_other_connection_or_key_fails() {
        let c = SynCookies::new(KEY);
        let f = flow([198, 18, 0, 2], 40000);
        let cookie = c.generate(&f, 1, 1460, 500);
        assert!(
            c.check(&flow([198, 18, 0, 3], 40000), 2, cookie + 1, 500)
                .is_none()
        );
        assert!(
            c.check(&flow([198, 18, 0, 2], 40001), 2, cookie + 1, 500)
                .is_none()
        );
        assert!(c.check(&f, 3, cookie + 1, 500).is_none(), "another client ISN");
        assert!(
            SynCookies::new(*b"fedcba9876543210")
                .check(&f, 2, cookie + 1, 500)
                .is_none()
        );
        // The MSS bits are under the MAC: raising them is a forgery.
        let bumped = cookie ^ (1 << MAC_BITS);
        assert!(c.check(&f, 2, bumped + 1, 500).is_none());
    }

    #[test]
    fn forging_costs_two_to_the_24_tries() {
        let c = SynCookies::new(KEY);
        let f = flow([198, 18, 0, 2], 40000);
        // A deterministic stream of guesses.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let accepted = (0..1_000_000)
            .filter(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.check(&f, 2, x as u32, 700).is_some()
            })
            .count();
        // Expected 1e6 × 2 / 32 slots × 2^-24 ≈ 0.004.
        assert!(
            accepted <= 1,
            "{accepted} forged cookies accepted out of 1 M guesses"
        );
    }

    proptest! {
        #[test]
        fn every_fresh_cookie_checks(a in any::<[u8; 4]>(), port in 1u16.., isn in any::<u32>(), mss in 0u16.., t in 0u64..1u64 << 40) {
            let c = SynCookies::new(KEY);
            let f = flow(a, port);
            let cookie = c.generate(&f, isn, mss, t);
            prop_assert!(c.check(&f, isn.wrapping_add(1), cookie.wrapping_add(1), t).is_some());
        }
    }
}
