//! Memory a burst of connections used is given back to the kernel once
//! they are gone, so an attack does not leave the daemon larger for good.
//! Its own process (one test file): resident memory is the process's.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Harness, connect_from, metric};
use tokio::io::AsyncWriteExt;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Slowloris: 1000 connections, each a request head that never ends, cut
/// by the header deadline. What they took must go back: resident memory
/// returns to within a quarter of the burst's growth above the baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_slowloris_burst_took_is_given_back() {
    let h = Harness::start("header_read_timeout = \"1s\"", "").await;
    // Warm up what every connection path allocates once.
    let mut c = common::Client::connect("127.0.9.1", h.proxy()).await;
    assert_eq!(c.get("/").await.0, 200);
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let base = rss_kib();
    let mut conns = Vec::new();
    for i in 0..1000 {
        // 40 addresses, 25 connections each: under every per-address bound.
        let mut s = connect_from(&format!("127.0.10.{}", 1 + i % 40), h.proxy()).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa")
            .await
            .unwrap();
        conns.push(s);
        if i % 40 == 39 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let mut cut = false;
    for _ in 0..200 {
        let m = h.metrics().await;
        if metric(&m, "palisade_connection_timeouts_total{kind=\"header\"}") >= 1000.0 {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cut, "the daemon did not cut the 1000 slow heads");
    let peak = rss_kib();
    drop(conns);
    let grew = peak.saturating_sub(base);
    assert!(
        grew > 8 << 10,
        "the burst took only {grew} KiB: nothing to give back"
    );
    let mut now = peak;
    for _ in 0..200 {
        now = rss_kib();
        if now <= base + grew / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("resident: {base} KiB before, {peak} KiB at the burst, {now} KiB after");
    assert!(
        now <= base + grew / 4,
        "resident memory stayed at {now} KiB after the burst ({base} KiB before, {peak} KiB at it)"
    );
    h.running.shutdown().await;
}
