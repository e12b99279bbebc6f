//! The reputation store at scale: 10 M random IPv4 + 1 M IPv6 entries,
//! against a plain `HashMap` and a Bloom filter in front of a table (the
//! design started from, sized right).
//!
//! `cargo bench -p palisade-store --bench store` prints a one-off report
//! (sizes, build/open/delta times, filter false-positive rate, p99 lookup
//! latency, latency during a swap) and then the criterion throughput runs.
#![allow(clippy::disallowed_methods)] // a benchmark reads the clock by definition
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use ipnet::IpNet;
use palisade_store::{Action, BuildOptions, Builder, Delta, Op, Snapshot, StoreCell};

const N4: usize = 10_000_000;
const N6: usize = 1_000_000;
/// Keys per measured batch: large enough that the probed entries do not
/// stay in cache between iterations (a small repeated batch would flatter
/// every structure, the hash map most).
const BATCH: usize = 1 << 20;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

struct Data {
    v4: Vec<u32>,
    v6: Vec<u128>,
}

fn data() -> Data {
    let mut rng = Rng(42);
    let mut v4: Vec<u32> = (0..N4 + N4 / 50).map(|_| rng.next() as u32).collect();
    v4.sort_unstable();
    v4.dedup();
    v4.truncate(N4);
    // Shuffle back so that "hits" are not in address order.
    for i in (1..v4.len()).rev() {
        v4.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let v6 = (0..N6)
        .map(|_| u128::from(rng.next()) << 64 | u128::from(rng.next()))
        .collect();
    Data { v4, v6 }
}

fn build(d: &Data, filter: bool, one_verdict: bool, with_v6: bool) -> Snapshot {
    let mut b = Builder::new();
    let reasons = ["spam", "scan", "botnet", "tor", "bruteforce"];
    for &ip in &d.v4 {
        let (score, reason) = if one_verdict {
            (0, "")
        } else {
            ((ip % 31) as u8, reasons[(ip % 5) as usize])
        };
        b.insert(
            IpNet::from(IpAddr::from(ip.to_be_bytes())),
            score,
            Action::Score,
            reason,
            0,
        )
        .unwrap();
    }
    if with_v6 {
        for &ip in &d.v6 {
            b.insert(
                IpNet::from(IpAddr::from(ip.to_be_bytes())),
                (ip % 17) as u8,
                Action::Score,
                "scan",
                0,
            )
            .unwrap();
        }
    }
    b.finish(BuildOptions {
        filter,
        created_unix: 0,
        ..BuildOptions::default()
    })
    .unwrap()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Addresses not in the store (random, so ~0.2 % of them would be members:
/// they are filtered out).
fn misses(d: &Data, n: usize, seed: u64) -> Vec<u32> {
    let set: std::collections::HashSet<u32> = d.v4.iter().copied().collect();
    let mut rng = Rng(seed);
    (0..n * 2)
        .map(|_| rng.next() as u32)
        .filter(|x| !set.contains(x))
        .take(n)
        .collect()
}

/// Zipf-like: 90 % of lookups go to 1 000 hot addresses (half of them
/// listed), the rest are random misses: what a busy site sees.
fn skewed(d: &Data, miss: &[u32], n: usize) -> Vec<u32> {
    let mut rng = Rng(9);
    let hot: Vec<u32> = d.v4[..500]
        .iter()
        .copied()
        .chain(miss[..500].iter().copied())
        .collect();
    (0..n)
        .map(|i| {
            if rng.next() % 10 < 9 {
                hot[(rng.next() % 1000) as usize]
            } else {
                miss[500 + i % (miss.len() - 500)]
            }
        })
        .collect()
}

fn report(d: &Data, full: &Snapshot, miss: &[u32]) {
    println!("== reputation store report ({N4} IPv4 + {N6} IPv6 random entries) ==");
    let t = Instant::now();
    let rebuilt = build(d, true, false, true);
    let build_time = t.elapsed();
    let i = rebuilt.info();
    println!(
        "build (in memory, 11 M entries, 155 verdicts): {build_time:.2?}; snapshot {:.1} MiB = {:.2} B/entry (filter {:.1} MiB)",
        mib(i.bytes),
        i.bytes as f64 / i.entries() as f64,
        mib(i.filter_bytes)
    );
    let set = build(d, false, true, false);
    let set_f = build(d, true, true, false);
    println!(
        "exact 10 M IPv4 set (one verdict): {:.2} MiB without filter, {:.2} MiB with",
        mib(set.info().bytes),
        mib(set_f.info().bytes)
    );
    let path = std::env::temp_dir().join(format!("palisade-bench-{}.pstore", std::process::id()));
    full.write_to(&path).unwrap();
    let mut opens: Vec<Duration> = (0..11)
        .map(|_| {
            let t = Instant::now();
            let opened = Snapshot::open(&path).unwrap();
            let took = t.elapsed();
            black_box(opened);
            took
        })
        .collect();
    opens.sort();
    println!(
        "open (read into private memory + header + CRC-32 of {:.1} MiB, page cache warm): median of 11 {:.2?}",
        mib(full.info().bytes),
        opens[5]
    );
    let _ = std::fs::remove_file(&path);

    let fp = miss
        .iter()
        .filter(|&&ip| full.prefilter(IpAddr::from(ip.to_be_bytes())))
        .count();
    println!(
        "prefilter false positives: {fp} of {} misses = {:.3} %",
        miss.len(),
        fp as f64 * 100.0 / miss.len() as f64
    );

    // p99 of single lookups, each timed on its own (includes ~20 ns of timer).
    let mut lat: Vec<u32> = Vec::with_capacity(1_000_000);
    for &ip in
        d.v4.iter()
            .step_by(7)
            .take(500_000)
            .chain(miss.iter().take(500_000))
    {
        let t = Instant::now();
        black_box(full.lookup_v4(black_box(ip), 0));
        lat.push(t.elapsed().as_nanos() as u32);
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "single lookup latency (timer included, 1 M lookups, 50 % hits): p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns",
        pct(0.5),
        pct(0.99),
        pct(0.999),
        lat[lat.len() - 1]
    );

    // A 100 000-operation delta: 50 k new, 30 k updated, 20 k deleted.
    let mut ops = Vec::with_capacity(100_000);
    for &ip in miss.iter().take(50_000) {
        ops.push(upsert(ip, 3));
    }
    for &ip in d.v4.iter().take(30_000) {
        ops.push(upsert(ip, 99));
    }
    for &ip in d.v4.iter().skip(30_000).take(20_000) {
        ops.push(Op::Delete(IpNet::from(IpAddr::from(ip.to_be_bytes()))));
    }
    let delta = Delta { from: 0, to: 1, ops };
    let text = delta.encode();
    let cell = Arc::new(StoreCell::new(build(d, true, false, true), None));
    let stop = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let reader = {
        let (cell, stop, worst, done) = (cell.clone(), stop.clone(), worst.clone(), done.clone());
        let probe: Vec<u32> = d.v4[50_000..].iter().step_by(101).copied().take(65_536).collect();
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                // Probes skip the deleted range: every one must hit, before
                // and after the swap.
                let hit = cell.lookup(IpAddr::from(probe[i % probe.len()].to_be_bytes()), 0);
                let ns = t.elapsed().as_nanos() as u64;
                assert!(hit.is_some(), "lookup failed during swap");
                worst.fetch_max(ns, Ordering::Relaxed);
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let before = done.load(Ordering::Relaxed);
    let t = Instant::now();
    let applied = cell.apply_delta(&text, "bench", BuildOptions::default()).unwrap();
    let apply_time = t.elapsed();
    let during = done.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert!(applied);
    println!(
        "delta of 100 000 ops (parse + merge into 11 M + overlay filter + swap): {apply_time:.2?}; a reader thread did {during} lookups meanwhile, worst {} µs, none failed",
        worst.load(Ordering::Relaxed) / 1000
    );
    let second = Delta {
        from: 1,
        to: 2,
        ops: d.v4[100_000..200_000].iter().map(|&ip| upsert(ip, 7)).collect(),
    };
    let t = Instant::now();
    let compact = BuildOptions {
        compact: true,
        ..BuildOptions::default()
    };
    assert!(cell.apply_delta(&second.encode(), "bench", compact).unwrap());
    println!(
        "delta of 100 000 ops with a full filter rebuild (--compact): {:.2?}",
        t.elapsed()
    );
    let t = Instant::now();
    cell.replace(build(d, true, false, true));
    println!(
        "build from unsorted records + swap, 11 M entries: {:.2?}",
        t.elapsed()
    );

    let t = Instant::now();
    let map: HashMap<u32, u8, foldhash::fast::RandomState> =
        d.v4.iter().map(|&ip| (ip, (ip % 31) as u8)).collect();
    println!(
        "HashMap<u32, u8> (foldhash) of 10 M: built in {:.2?}, ~{:.0} MiB (buckets × 9 B)",
        t.elapsed(),
        mib(map.capacity().next_power_of_two() as u64 * 9)
    );
    let bloom = bloom_of(d);
    println!(
        "Bloom filter at 0.01 % FPR for 10 M: {:.1} MiB, {} hashes (plus the table behind it)",
        mib(bloom.num_bits() as u64 / 8),
        bloom.num_hashes()
    );
}

/// Reads the answer, as a caller would (a bare `is_some` lets the
/// compiler skip loading the verdict).
fn score(v: Option<palisade_store::Verdict>) -> u64 {
    v.map_or(0, |v| u64::from(v.score) + 1)
}

fn lookups(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: String,
    keys: &[u32],
    lookup: impl Fn(u32) -> u64,
) {
    g.bench_function(id, |b| {
        b.iter(|| keys.iter().map(|&ip| lookup(black_box(ip))).sum::<u64>())
    });
}

fn upsert(ip: u32, score: u8) -> Op {
    Op::Upsert {
        net: IpNet::from(IpAddr::from(ip.to_be_bytes())),
        score,
        action: Action::Score,
        reason: "feed".into(),
        expires: 0,
    }
}

fn bloom_of(d: &Data) -> fastbloom::BloomFilter {
    let mut bloom = fastbloom::BloomFilter::with_false_pos(0.0001).expected_items(N4);
    for ip in &d.v4 {
        bloom.insert(ip);
    }
    bloom
}

fn main() {
    let d = data();
    let full = build(&d, true, false, true);
    let miss = misses(&d, 1_000_000, 7);
    report(&d, &full, &miss);

    let nofilter = build(&d, false, false, true);
    let map: HashMap<u32, u8, foldhash::fast::RandomState> =
        d.v4.iter().map(|&ip| (ip, (ip % 31) as u8)).collect();
    let bloom = bloom_of(&d);
    let hits: Vec<u32> = d.v4[..BATCH].to_vec();
    let misses: Vec<u32> = miss.iter().copied().cycle().take(BATCH).collect();
    let skew = skewed(&d, &miss, BATCH);
    let hits6: Vec<u128> = d.v6.iter().copied().cycle().take(BATCH).collect();
    let mut rng = Rng(3);
    let misses6: Vec<u128> = (0..BATCH)
        .map(|_| u128::from(rng.next()) << 64 | u128::from(rng.next()))
        .collect();

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let cold: [(&str, &[u32]); 3] = [("hit", &hits), ("miss", &misses), ("skewed", &skew)];
    // The same lookups over 4096 distinct keys repeated: the entries they
    // touch stay in cache, as for a site whose active clients fit in L2/L3.
    let hot: [(&str, &[u32]); 2] = [("hit", &hits[..4096]), ("miss", &misses[..4096])];
    for (group, sets, with_bloom) in [("store_v4", &cold[..], true), ("store_v4_hot", &hot[..], false)] {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(sets[0].1.len() as u64));
        for &(name, keys) in sets {
            // Each contender answers one lookup per key, reading the value.
            lookups(&mut g, format!("palisade/{name}"), keys, |ip| {
                score(full.lookup_v4(ip, 0))
            });
            lookups(&mut g, format!("palisade_nofilter/{name}"), keys, |ip| {
                score(nofilter.lookup_v4(ip, 0))
            });
            lookups(&mut g, format!("hashmap/{name}"), keys, |ip| {
                map.get(&ip).map_or(0, |&v| u64::from(v) + 1)
            });
            if with_bloom {
                lookups(&mut g, format!("bloom+hashmap/{name}"), keys, |ip| {
                    match bloom.contains(&ip) {
                        true => map.get(&ip).map_or(0, |&v| u64::from(v) + 1),
                        false => 0,
                    }
                });
            }
        }
        g.finish();
    }
    let mut g = c.benchmark_group("store_v6");
    g.throughput(Throughput::Elements(BATCH as u64));
    let sets6: [(&str, &[u128]); 2] = [("hit", &hits6), ("miss", &misses6)];
    for (name, keys) in sets6 {
        g.bench_function(format!("palisade/{name}"), |b| {
            b.iter(|| {
                keys.iter()
                    .map(|&ip| score(full.lookup_v6(black_box(ip), 0)))
                    .sum::<u64>()
            })
        });
    }
    g.finish();
    c.final_summary();
}
