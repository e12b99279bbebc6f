//! Where tasks come from, and a watchdog for task leaks.
//!
//! Every task Palisade spawns is wrapped with [`tracked`], which records the
//! spawn site (`#[track_caller]`) and counts live tasks per site. The
//! [`Watchdog`] samples the runtime's live task count; when it grows by more
//! than the configured fraction over a minute, it names the sites that grew
//! and alerts once per site per cooldown.

use std::collections::HashMap;
use std::future::Future;
use std::panic::Location;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use palisade_core::{NANOS_PER_SEC, Nanos};

type Site = &'static Location<'static>;

fn sites() -> &'static Mutex<HashMap<Site, Arc<AtomicI64>>> {
    static SITES: OnceLock<Mutex<HashMap<Site, Arc<AtomicI64>>>> = OnceLock::new();
    SITES.get_or_init(Default::default)
}

pin_project_lite::pin_project! {
    /// A future counted as a live task of its spawn site until dropped.
    pub struct Tracked<F> {
        #[pin]
        inner: F,
        live: Arc<AtomicI64>,
    }

    impl<F> PinnedDrop for Tracked<F> {
        fn drop(this: Pin<&mut Self>) {
            this.live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Wraps a future about to be spawned; the caller's location is its site.
#[track_caller]
pub fn tracked<F: Future>(inner: F) -> Tracked<F> {
    let site = Location::caller();
    let live = {
        let mut map = sites().lock().unwrap_or_else(|p| p.into_inner());
        map.entry(site).or_default().clone()
    };
    live.fetch_add(1, Ordering::Relaxed);
    Tracked { inner, live }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// `tokio::spawn` of a [`tracked`] future.
#[track_caller]
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(tracked(fut))
}

/// Live tasks per spawn site (`file:line`), largest first.
pub fn live_by_site() -> Vec<(String, i64)> {
    let map = sites().lock().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<_> = map
        .iter()
        .map(|(site, n)| {
            (
                format!("{}:{}", site.file(), site.line()),
                n.load(Ordering::Relaxed),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    v
}

/// Watchdog rules.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchdogConfig {
    /// Growth of the live task count over a minute that raises an alert
    /// (0.10 = 10 %).
    pub growth_per_minute: f64,
    /// Fewest live tasks before growth counts (a quiet daemon doubling from
    /// 5 to 10 tasks is not a leak).
    pub min_tasks: u64,
    /// No second alert for the same site within this long.
    pub cooldown: Nanos,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        Self {
            growth_per_minute: 0.10,
            min_tasks: 100,
            cooldown: 600 * NANOS_PER_SEC,
        }
    }
}

/// A task-growth alert for one spawn site.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// `file:line` of the spawn.
    pub site: String,
    /// Live tasks there now.
    pub live: i64,
    /// How many more than a minute ago.
    pub grew_by: i64,
    /// Live tasks overall now and a minute ago.
    pub total: (u64, u64),
}

/// Leak detection over samples; pure, clock-injected.
#[derive(Debug)]
pub struct Watchdog {
    cfg: WatchdogConfig,
    /// (time, total live tasks, live per site), oldest first, about a minute.
    samples: std::collections::VecDeque<(Nanos, u64, HashMap<String, i64>)>,
    last_alert: HashMap<String, Nanos>,
}

const MINUTE: Nanos = 60 * NANOS_PER_SEC;

impl Watchdog {
    /// A watchdog with no history.
    pub fn new(cfg: WatchdogConfig) -> Self {
        Self {
            cfg,
            samples: Default::default(),
            last_alert: HashMap::new(),
        }
    }

    /// Adds a sample; returns the alerts it raises.
    pub fn observe(&mut self, now: Nanos, total: u64, sites: &[(String, i64)]) -> Vec<Alert> {
        let by_site: HashMap<String, i64> = sites.iter().cloned().collect();
        // Keep the newest sample that is at least a minute old, and all after it.
        while self.samples.len() > 1 && now.saturating_sub(self.samples[1].0) >= MINUTE {
            self.samples.pop_front();
        }
        let mut alerts = Vec::new();
        if let Some((then, old_total, old_sites)) = self.samples.front()
            && now.saturating_sub(*then) >= MINUTE
            && total >= self.cfg.min_tasks
            && (total as f64) > (*old_total as f64) * (1.0 + self.cfg.growth_per_minute)
        {
            let old_total = *old_total;
            for (site, live) in &by_site {
                let grew_by = live - old_sites.get(site).copied().unwrap_or(0);
                if grew_by <= 0 {
                    continue;
                }
                // Only sites that account for a real share of the growth.
                let growth = total.saturating_sub(old_total) as i64;
                if grew_by * 10 < growth {
                    continue;
                }
                let quiet = self
                    .last_alert
                    .get(site)
                    .is_none_or(|t| now.saturating_sub(*t) >= self.cfg.cooldown);
                if quiet {
                    self.last_alert.insert(site.clone(), now);
                    alerts.push(Alert {
                        site: site.clone(),
                        live: *live,
                        grew_by,
                        total: (total, old_total),
                    });
                }
            }
        }
        self.samples.push_back((now, total, by_site));
        alerts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Nanos = NANOS_PER_SEC;

    fn run(w: &mut Watchdog, minutes: u64, leak_a: i64, leak_b: i64) -> Vec<Alert> {
        let mut alerts = Vec::new();
        let mut a = 100;
        let mut b = 0;
        for step in 0..=(minutes * 12) {
            let now = step * 5 * SEC;
            if step % 12 == 0 && step > 0 {
                a += leak_a;
                b += leak_b;
            }
            let sites = vec![
                ("a.rs:1".to_string(), a),
                ("b.rs:2".to_string(), b),
                ("c.rs:3".to_string(), 50),
            ];
            alerts.extend(w.observe(now, (a + b + 50) as u64, &sites));
        }
        alerts
    }

    #[test]
    fn a_leaking_site_alerts_once_per_cooldown() {
        let mut w = Watchdog::new(WatchdogConfig::default());
        // Site a grows by 30 tasks a minute (20 % of 150): for 9 minutes.
        let alerts = run(&mut w, 9, 30, 0);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].site, "a.rs:1");
        assert_eq!(alerts[0].grew_by, 30);
        assert_eq!(alerts[0].total, (180, 150));
    }

    #[test]
    fn two_leaking_sites_alert_once_each() {
        let mut w = Watchdog::new(WatchdogConfig::default());
        let mut alerts = run(&mut w, 5, 25, 25);
        alerts.sort_by(|x, y| x.site.cmp(&y.site));
        let sites: Vec<_> = alerts.iter().map(|a| a.site.as_str()).collect();
        assert_eq!(sites, ["a.rs:1", "b.rs:2"]);
    }

    #[test]
    fn steady_or_slow_growth_is_not_a_leak() {
        let mut w = Watchdog::new(WatchdogConfig::default());
        assert!(run(&mut w, 10, 0, 0).is_empty());
        // 5 more a minute on 150: 3 %.
        let mut w = Watchdog::new(WatchdogConfig::default());
        assert!(run(&mut w, 10, 5, 0).is_empty());
    }

    #[test]
    fn the_cooldown_ends() {
        let cfg = WatchdogConfig {
            cooldown: 120 * SEC,
            ..Default::default()
        };
        let mut w = Watchdog::new(cfg);
        let alerts = run(&mut w, 6, 40, 0);
        assert!(alerts.len() >= 2, "{alerts:?}");
        assert!(alerts.iter().all(|a| a.site == "a.rs:1"));
    }

    #[tokio::test]
    async fn tracked_tasks_are_counted_by_site_until_they_end() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut handles = Vec::new();
        for _ in 0..3 {
            let mut rx = rx.clone();
            handles.push(spawn(async move {
                let _ = rx.changed().await;
            }));
        }
        let here = format!("{}:", file!());
        let live: i64 = live_by_site()
            .iter()
            .filter(|(site, _)| site.starts_with(&here))
            .map(|(_, n)| n)
            .sum();
        assert_eq!(live, 3);
        tx.send(true).unwrap();
        for h in handles {
            h.await.unwrap();
        }
        let live: i64 = live_by_site()
            .iter()
            .filter(|(site, _)| site.starts_with(&here))
            .map(|(_, n)| n)
            .sum();
        assert_eq!(live, 0);
    }
}
