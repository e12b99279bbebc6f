//! The reputation store at scale: 10 M random IPv4 + 1 M IPv6 entries,
//! against a plain `HashMap` and a Bloom filter in front of a table (the
//! design started from, sized right).
//!
//! `cargo bench -p palisade-store --bench store` prints a one-off report
//! (sizes, build/open/delta times, filter false-positive rate, p99 lookup
//! latency, latency during a swap) and then the criterion throughput runs.
//!
//! The criterion runs look up the snapshot `Builder::finish` returns, in
//! memory. What the daemon serves from is the file at `store.path` opened
//! with `StoreCell::open_trusted` (read into private memory and checked);
//! the report opens that file the same way, with the file's pages evicted
//! from the page cache (`posix_fadvise(DONTNEED)`, checked with `mincore`)
//! and with them cached, and times the open and the lookups after it.
//! `cargo bench -p palisade-store --bench store -- no-criterion-run` prints
//! only the report.
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
use std::os::fd::AsRawFd as _;
use std::path::Path;

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
    file_report(d, full, miss);

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

/// Pages of `path` in the page cache, out of all of them (`mincore` over a
/// read-only mapping made only for counting).
fn cached_pages(path: &Path) -> (usize, usize) {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
    let pages = len.div_ceil(page);
    // SAFETY: a fresh shared read-only mapping of an open file, never
    // dereferenced, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "mmap {}", path.display());
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the mapping.
    let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    // SAFETY: the mapping made above, of `len` bytes.
    unsafe { libc::munmap(map, len) };
    (vec.iter().filter(|&&b| b & 1 == 1).count(), pages)
}

/// Bytes read so far from the block device holding `path`
/// (`/sys/dev/block/MAJ:MIN/stat`, field 3, in 512-byte sectors): shows
/// that a cold open really read the disk. `None` where the device has no
/// statistics (a tmpfs, an overlay).
fn device_bytes_read(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    let sectors: u64 = stat.split_whitespace().nth(2)?.parse().ok()?;
    Some(sectors * 512)
}

/// Drops the file's pages from the page cache (written back first: dirty
/// pages cannot be dropped) and checks that they are gone.
fn evict(path: &Path) {
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: an open descriptor; offset 0 and length 0 mean the whole file.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
    let (cached, pages) = cached_pages(path);
    // A page or two may be read back by someone else; more means the
    // eviction did not happen and "cold" would be a lie.
    assert!(cached * 100 <= pages, "{cached} of {pages} pages still cached");
}

/// One open: its time, the first lookup batch, the steady batch, and the
/// bytes the device read meanwhile.
type Open = (Duration, Duration, Duration, Option<u64>);

/// The daemon's path: the snapshot written to a file and opened with
/// `StoreCell::open_trusted`, cold (the file's pages evicted) and warm.
/// After each open, 1 M lookups (half hits) are timed as a batch: the
/// first batch right after the open, then the median of 5 more; the
/// snapshot `Builder::finish` returned gets the same 5 batches.
fn file_report(d: &Data, full: &Snapshot, miss: &[u32]) {
    // Next to the target directory, on the disk a store would live on
    // (a tmpfs /tmp would hold the file in memory whatever we advise).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    let path = dir.join(format!("palisade-bench-{}.pstore", std::process::id()));
    full.write_to(&path).unwrap();
    let keys: Vec<u32> =
        d.v4.iter()
            .step_by(7)
            .take(500_000)
            .chain(miss.iter().take(500_000))
            .copied()
            .collect();
    let batch = |s: &Snapshot| {
        let t = Instant::now();
        black_box(
            keys.iter()
                .map(|&ip| score(s.lookup_v4(black_box(ip), 0)))
                .sum::<u64>(),
        );
        t.elapsed()
    };
    let median = |s: &Snapshot| {
        let mut t: Vec<Duration> = (0..5).map(|_| batch(s)).collect();
        t.sort();
        t[2]
    };
    let per_s = |t: Duration| keys.len() as f64 / t.as_secs_f64() / 1e6;
    let run = |cold: bool| {
        if cold {
            evict(&path);
        } else {
            // Read once so that every page is cached.
            black_box(StoreCell::open_trusted(&path, None).unwrap());
            let (cached, pages) = cached_pages(&path);
            assert_eq!(cached, pages, "warm, yet not all cached");
        }
        let before = device_bytes_read(&path);
        let t = Instant::now();
        let cell = StoreCell::open_trusted(&path, None).unwrap();
        let open = t.elapsed();
        let read = before.zip(device_bytes_read(&path)).map(|(a, b)| b - a);
        let snapshot = cell.load();
        let first = batch(&snapshot);
        (open, first, median(&snapshot), read)
    };
    for cold in [true, false] {
        let mut runs: Vec<Open> = (0..5).map(|_| run(cold)).collect();
        // Other processes read the same disk: the least read is the
        // closest to this open's own.
        let device = runs.iter().filter_map(|r| r.3).min();
        let mut pick = |f: fn(&Open) -> Duration| {
            runs.sort_by_key(f);
            (f(&runs[0]), f(&runs[2]), f(&runs[4]))
        };
        let (open_min, open, open_max) = pick(|r| r.0);
        let (_, first, _) = pick(|r| r.1);
        let (_, steady, _) = pick(|r| r.2);
        println!(
            "file via StoreCell::open_trusted ({:.1} MiB), page cache {}: open median of 5 {open:.2?} (min {open_min:.2?}, max {open_max:.2?}), device read per open at least {}; 1 M lookups (50 % hits) right after the open {:.1} M/s, then {:.1} M/s (medians)",
            mib(full.info().bytes),
            if cold { "cold (file evicted)" } else { "warm" },
            device.map_or("unknown".to_owned(), |b| format!("{:.1} MiB", mib(b))),
            per_s(first),
            per_s(steady)
        );
    }
    println!(
        "the same 1 M lookups in the snapshot Builder::finish returned (what the criterion runs use): {:.1} M/s (median of 5)",
        per_s(median(full))
    );
    let _ = std::fs::remove_file(&path);
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
