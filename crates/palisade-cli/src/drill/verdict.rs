//! Pass or fail: an attack's measurements against the thresholds. Pure,
//! so every rule is tested on numbers.

use super::population::Stats;
use super::report::{Resource, Thresholds, Verdict};

/// Descriptors a daemon may hold above `before × (1 + slack)` after an
/// attack without it counting: the legitimate population's connections
/// in flight at the moment of the reading.
pub const FD_FLOOR: u64 = 16;
/// Resident KiB likewise: allocator arenas that stay mapped once touched.
pub const RSS_FLOOR_KIB: u64 = 16 << 10;

/// What was measured around one attack.
#[derive(Clone, Debug)]
pub struct Measured {
    /// The population while the attack ran.
    pub during: Stats,
    /// The population once it stopped.
    pub after: Stats,
    /// The daemon's descriptors.
    pub fds: Resource,
    /// Its resident memory.
    pub rss_kib: Resource,
    /// What got through, as the attacker saw it.
    pub breaches: Vec<String>,
}

/// The verdict on `m`.
pub fn judge(t: &Thresholds, m: &Measured) -> Verdict {
    let mut reasons = Vec::new();
    for (when, s) in [("during", &m.during), ("after", &m.after)] {
        if s.sent == 0 {
            reasons.push(format!("no legitimate request was due {when} the attack"));
            continue;
        }
        if s.success() < t.min_legit_success {
            reasons.push(format!(
                "legitimate success {when} the attack {:.1} % ({} of {}) < {:.1} %",
                s.success() * 100.0,
                s.ok,
                s.sent,
                t.min_legit_success * 100.0
            ));
        }
        let p99_ms = s.p99.as_secs_f64() * 1e3;
        if let Some(max) = t.max_p99_ms.filter(|max| p99_ms > *max) {
            reasons.push(format!(
                "legitimate p99 {when} the attack {p99_ms:.1} ms > {max} ms"
            ));
        }
    }
    for (what, r, floor, unit) in [
        ("open descriptors", m.fds, FD_FLOOR, ""),
        ("resident memory", m.rss_kib, RSS_FLOOR_KIB, " KiB"),
    ] {
        let bound = (r.before as f64 * (1.0 + t.resource_slack)) as u64 + floor;
        if r.after > bound {
            reasons.push(format!(
                "{what} did not come back: {}{unit} after, {}{unit} before (at most {bound}{unit})",
                r.after, r.before
            ));
        }
    }
    reasons.extend(m.breaches.iter().cloned());
    Verdict {
        pass: reasons.is_empty(),
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn stats(sent: u32, ok: u32, p99_ms: u64) -> Stats {
        Stats {
            sent,
            ok,
            p99: Duration::from_millis(p99_ms),
        }
    }

    fn healthy() -> Measured {
        Measured {
            during: stats(1000, 995, 20),
            after: stats(400, 400, 5),
            fds: Resource {
                before: 40,
                during: 900,
                after: 44,
            },
            rss_kib: Resource {
                before: 30_000,
                during: 60_000,
                after: 33_000,
            },
            breaches: Vec::new(),
        }
    }

    fn thresholds() -> Thresholds {
        Thresholds {
            min_legit_success: 0.99,
            max_p99_ms: None,
            resource_slack: 0.25,
        }
    }

    #[test]
    fn a_held_attack_passes() {
        let v = judge(&thresholds(), &healthy());
        assert!(v.pass, "{:?}", v.reasons);
    }

    #[test]
    fn each_threshold_fails_on_its_own() {
        let t = thresholds();
        let mut m = healthy();
        m.during = stats(1000, 980, 20);
        assert!(judge(&t, &m).reasons[0].contains("98.0 % (980 of 1000) < 99.0 %"));

        let mut m = healthy();
        m.after = stats(0, 0, 0);
        assert!(judge(&t, &m).reasons[0].contains("no legitimate request"));

        let mut m = healthy();
        m.fds.after = 40 * 5 / 4 + FD_FLOOR + 1;
        assert!(judge(&t, &m).reasons[0].contains("open descriptors did not come back"));

        let mut m = healthy();
        m.rss_kib.after = 80_000;
        assert!(judge(&t, &m).reasons[0].contains("resident memory"));

        let mut m = healthy();
        m.breaches.push("one address got 900 requests through".into());
        assert_eq!(judge(&t, &m).reasons, ["one address got 900 requests through"]);

        let t = Thresholds {
            max_p99_ms: Some(10.0),
            ..thresholds()
        };
        let v = judge(&t, &healthy());
        assert!(!v.pass);
        assert_eq!(v.reasons, ["legitimate p99 during the attack 20.0 ms > 10 ms"]);
    }
}
