//! The legitimate population: many addresses, each asking for `/` at a
//! steady pace on a fresh connection, open-loop (a slow answer does not
//! slow the next request down, as real users do not wait for each other).
//! What each request got, and how long it took, is what the verdicts are
//! made of.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::wire;

/// A request not answered within this counts as failed.
pub const TIMEOUT: Duration = Duration::from_secs(1);

/// One legitimate request.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    /// When it was due, since the drill started.
    pub at: Duration,
    /// Answered 200 within [`TIMEOUT`].
    pub ok: bool,
    /// From when it was due to its whole answer (or to giving up).
    pub latency: Duration,
}

/// Success and tail latency over a window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// Requests due in the window.
    pub sent: u32,
    /// Of them, answered 200 in time.
    pub ok: u32,
    /// 99th percentile latency of the successful ones.
    pub p99: Duration,
}

impl Stats {
    /// `ok / sent`; 0 when nothing was sent (the population itself failed).
    pub fn success(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            f64::from(self.ok) / f64::from(self.sent)
        }
    }

    /// Over `records`.
    pub fn of<'a>(records: impl IntoIterator<Item = &'a Record>) -> Self {
        let mut sent = 0;
        let mut ok = 0;
        let mut latencies = Vec::new();
        for r in records {
            sent += 1;
            if r.ok {
                ok += 1;
                latencies.push(r.latency);
            }
        }
        latencies.sort_unstable();
        let p99 = match latencies.len() {
            0 => Duration::ZERO,
            n => latencies[(n * 99).div_ceil(100) - 1],
        };
        Self { sent, ok, p99 }
    }
}

/// The running population.
pub struct Population {
    records: Arc<Mutex<Vec<Record>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Population {
    /// `rate` requests per second in all, from `clients` round-robin, on
    /// the runtime `on`.
    pub fn start(
        on: &tokio::runtime::Handle,
        target: SocketAddr,
        clients: Vec<Ipv4Addr>,
        rate: u32,
        t0: Instant,
    ) -> Self {
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, done) = (records.clone(), stop.clone());
        let task = on.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
            let mut next = 0usize;
            while !done.load(Ordering::Relaxed) {
                let due = tick.tick().await;
                let from = clients[next % clients.len()];
                next += 1;
                let out = out.clone();
                tokio::spawn(async move {
                    let ok = tokio::time::timeout(TIMEOUT, request(from, target))
                        .await
                        .is_ok_and(|r| r.is_ok_and(|status| status == 200));
                    let record = Record {
                        at: due.saturating_duration_since(t0),
                        ok,
                        latency: due.elapsed(),
                    };
                    if let Ok(mut v) = out.lock() {
                        v.push(record);
                    }
                });
            }
        });
        Self { records, stop, task }
    }

    fn records(&self) -> Vec<Record> {
        let mut v = self.records.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort_by_key(|r| r.at);
        v
    }

    /// Stops sending, waits for the answers still due, and returns every
    /// request, in the order they were due.
    pub async fn stop(mut self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = (&mut self.task).await;
        tokio::time::sleep(TIMEOUT).await;
        self.records()
    }
}

async fn request(from: Ipv4Addr, target: SocketAddr) -> std::io::Result<u16> {
    let mut conn = wire::Conn::new(wire::connect(from, target).await?);
    let r = conn.exchange(&wire::get("/", "Connection: close\r\n")).await?;
    Ok(r.status)
}

/// Per-`bucket` samples over the whole run: (start, stats).
pub fn buckets(records: &[Record], bucket: Duration, until: Duration) -> Vec<(Duration, Stats)> {
    let mut out = Vec::new();
    let mut start = Duration::ZERO;
    while start < until {
        let end = start + bucket;
        out.push((
            start,
            Stats::of(records.iter().filter(|r| r.at >= start && r.at < end)),
        ));
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ms: u64, ok: bool, lat_ms: u64) -> Record {
        Record {
            at: Duration::from_millis(ms),
            ok,
            latency: Duration::from_millis(lat_ms),
        }
    }

    #[test]
    fn success_counts_failures_and_p99_reads_successes_only() {
        let mut records: Vec<Record> = (1..=100).map(|i| rec(i, true, i)).collect();
        records.push(rec(5, false, 2000));
        let s = Stats::of(&records);
        assert_eq!((s.sent, s.ok), (101, 100));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert!((s.success() - 100.0 / 101.0).abs() < 1e-9);
    }

    #[test]
    fn nothing_sent_is_no_success() {
        assert_eq!(Stats::of(&[]).success(), 0.0);
    }

    #[test]
    fn buckets_cover_the_run_and_each_request_once() {
        let records = [
            rec(0, true, 1),
            rec(249, true, 1),
            rec(250, false, 1),
            rec(600, true, 1),
        ];
        let b = buckets(&records, Duration::from_millis(250), Duration::from_millis(700));
        let sent: Vec<u32> = b.iter().map(|(_, s)| s.sent).collect();
        assert_eq!(sent, [2, 1, 1]);
        assert_eq!(b[1].1.ok, 0);
    }
}
