//! One table of 32-byte [`Record`]s, one per tracked client (and, for the
//! adaptive breaker's closed clients, of 16-byte ones: [`ClientsN`]).
//!
//! The table is exactly `max_tracked` records in one anonymous mapping.
//! A key has two candidate homes, each the start of a neighborhood of
//! [`NEIGHBORHOOD`] consecutive records (512 bytes); it lives in one of
//! those 32 records. Two independent homes keep the table usable when it
//! is nearly full, and a newcomer takes a free record in the emptier of
//! its two neighborhoods: measured in `fill_overflows_little` (100 000
//! records), no newcomer finds no record at half fill, 0.26 % at 90 %.
//!
//! **Eviction.** A record changes hands only when its client is idle: its
//! state equals a fresh one ([`Words::idle`]), so forgetting it loses
//! nothing, and an evicted abuser never comes back with a full bucket.
//! Among idle candidates the one quiet longest goes. Active clients are
//! never evicted, so a flood of fresh keys cannot push an established
//! client out; the flood's keys take free and idle records and, once there
//! are none, share a few *overflow* records picked by hash. Clients sharing
//! an overflow record share its budget: limits get stricter, never looser.
//!
//! **Memory follows clients.** The mapping is reserved at start and faulted
//! in 4 KiB pages as records are first written (huge pages are refused
//! while the table is sparse: one client would make 2 MiB resident). Once
//! `len / 64` records are claimed nearly every page is touched anyway, and
//! the table is advised for huge pages and collapsed into them by a
//! background thread, so random lookups stop missing the TLB.
//!
//! Two clients whose 32-bit tags collide in the same candidate records
//! would share state (stricter again). The hash is seeded per process, so
//! collisions cannot be aimed.

use std::hash::BuildHasher;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use palisade_core::{ClientKey, Nanos};

#[cfg(doc)]
use crate::record::Record;
use crate::record::{RecordN, Words, WordsN};

/// Records in one neighborhood.
pub const NEIGHBORHOOD: usize = 16;
const HUGE_PAGE: usize = 2 << 20;
const PAGE: usize = 4096;
/// Locks serializing the claims of new clients, by tag.
const STRIPES: usize = 64;

/// Where a client's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Its own record.
    Own,
    /// A record shared with other clients that found no record of their own.
    Overflow,
}

/// A bounded table of per-client records of `N` words.
pub struct ClientsN<const N: usize> {
    map: Arc<Mapping<N>>,
    len: usize,
    claimed: AtomicUsize,
    /// Its own small mapping, so its records are aligned as the table's.
    overflow: Mapping<N>,
    overflowed: AtomicU64,
    taken_over: AtomicU64,
    /// Set once the table has asked for huge pages.
    huge: AtomicBool,
    stripes: [AtomicBool; STRIPES],
    hasher: foldhash::fast::RandomState,
    /// When a record's state equals a fresh one, so it may change hands.
    idle: fn(&WordsN<N>, Nanos) -> bool,
}

/// The table of client state: 32-byte [`Record`]s.
pub type Clients = ClientsN<4>;

/// The record array: an anonymous mapping, zeroed by the kernel on first
/// touch.
struct Mapping<const N: usize> {
    ptr: NonNull<RecordN<N>>,
    len: usize,
    /// The whole mapping (alignment slack included), for `munmap`.
    map: *mut libc::c_void,
    map_len: usize,
}

// SAFETY: the mapping is owned like a `Box<[RecordN<N>]>`; records are shared
// only through `&`, and their fields are atomics.
unsafe impl<const N: usize> Send for Mapping<N> {}
// SAFETY: as above.
unsafe impl<const N: usize> Sync for Mapping<N> {}

impl<const N: usize> Mapping<N> {
    fn new(len: usize) -> Self {
        let Some(bytes) = len
            .checked_mul(size_of::<RecordN<N>>())
            .filter(|&b| b <= isize::MAX as usize - HUGE_PAGE)
        else {
            // Only reachable with absurd sizes, which config validation refuses.
            panic!("client table of {len} records does not fit in memory");
        };
        // Aligned to 2 MiB when large, so huge pages can back all of it later.
        let slack = if bytes >= HUGE_PAGE { HUGE_PAGE } else { 0 };
        let map_len = bytes + slack;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            let Ok(layout) = std::alloc::Layout::array::<RecordN<N>>(len) else {
                panic!("client table of {len} records does not fit in memory");
            };
            std::alloc::handle_alloc_error(layout);
        }
        let start = (map as usize).next_multiple_of(if slack > 0 { HUGE_PAGE } else { PAGE });
        #[cfg(target_os = "linux")]
        // SAFETY: the range lies inside the mapping just made; advice only
        // changes how the kernel backs it. Failure (THP not built in) leaves
        // 4 KiB pages, which is what is asked for.
        unsafe {
            libc::madvise(start as *mut libc::c_void, bytes, libc::MADV_NOHUGEPAGE);
        }
        let Some(ptr) = NonNull::new(start as *mut RecordN<N>) else {
            unreachable!("mmap succeeded, so the mapping is not at address 0");
        };
        Self {
            ptr,
            len,
            map,
            map_len,
        }
    }

    fn records(&self) -> &[RecordN<N>] {
        // SAFETY: `ptr` is page-aligned and points to `len` records inside
        // our live mapping. Anonymous memory reads as zeroes, and all-zero
        // bytes are a valid `RecordN` (`N` `AtomicU64`s). Records are only
        // changed through atomics.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes(&self) -> usize {
        self.len * size_of::<RecordN<N>>()
    }

    /// Asks for huge pages and collapses the already-resident 4 KiB pages
    /// into them (Linux 6.1+; without it, khugepaged does it in time).
    #[cfg(target_os = "linux")]
    fn go_huge(&self) {
        let start = self.ptr.as_ptr().cast::<libc::c_void>();
        // SAFETY: the range is inside our live mapping (kept alive by the
        // caller's `Arc`); advice does not change contents.
        unsafe { libc::madvise(start, self.bytes(), libc::MADV_HUGEPAGE) };
        #[cfg(target_env = "gnu")]
        // SAFETY: as above; collapsing copies pages, contents stay.
        unsafe {
            libc::madvise(start, self.bytes(), libc::MADV_COLLAPSE)
        };
    }

    /// Bytes of the table that are resident.
    #[cfg(target_os = "linux")]
    fn resident(&self) -> usize {
        let lo = self.ptr.as_ptr() as usize;
        resident_in(lo, lo + self.bytes())
    }
}

/// Resident bytes of this process's mappings within `[lo, hi)`, from
/// `/proc/self/smaps` (pages only read map the shared zero page, which is
/// not counted). For gauges and tests, not the request path.
#[cfg(target_os = "linux")]
pub(crate) fn resident_in(lo: usize, hi: usize) -> usize {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut inside = false;
    let mut sum = 0;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((a, b)) = range.split_once('-')
            && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            inside = a < hi && b > lo;
        } else if inside && let Some(kb) = line.strip_prefix("Rss:") {
            sum += kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
                * 1024;
        }
    }
    sum
}

impl<const N: usize> Drop for Mapping<N> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; records need no
        // drop and no reference into the mapping outlives `self`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// A key's tag and the starts of its two neighborhoods.
#[derive(Clone, Copy)]
struct Homes {
    tag: u32,
    a: usize,
    b: usize,
}

impl Clients {
    /// A table of exactly `max_tracked` records (at least [`NEIGHBORHOOD`]).
    pub fn new(max_tracked: usize) -> Self {
        Self::with_idle_rule(max_tracked, Words::idle)
    }
}

impl<const N: usize> ClientsN<N> {
    /// Records per cache line.
    const PER_LINE: usize = 64 / size_of::<RecordN<N>>();

    /// A table of records laid out by their user, who says when one is idle
    /// (its state equal to a fresh one's at `now`).
    pub(crate) fn with_idle_rule(max_tracked: usize, idle: fn(&WordsN<N>, Nanos) -> bool) -> Self {
        let len = max_tracked.max(NEIGHBORHOOD);
        let overflow_len = (len / 64).clamp(16, 4096).next_power_of_two();
        Self {
            map: Arc::new(Mapping::new(len)),
            len,
            claimed: AtomicUsize::new(0),
            overflow: Mapping::new(overflow_len),
            overflowed: AtomicU64::new(0),
            taken_over: AtomicU64::new(0),
            huge: AtomicBool::new(false),
            stripes: [const { AtomicBool::new(false) }; STRIPES],
            hasher: foldhash::fast::RandomState::default(),
            idle,
        }
    }

    #[inline]
    fn records(&self) -> &[RecordN<N>] {
        self.map.records()
    }

    #[inline]
    fn homes(&self, key: &ClientKey) -> Homes {
        // The seeded hash's low bits are weak for sequential keys: mix first.
        let h = fmix(self.hasher.hash_one(key));
        let g = fmix(h ^ 0x9E37_79B9_7F4A_7C15);
        let len = self.len as u64;
        Homes {
            tag: (h as u32).max(1),
            a: (((h >> 32) * len) >> 32) as usize,
            b: (((g >> 32) * len) >> 32) as usize,
        }
    }

    /// The 32 candidate positions of a key, first home first.
    #[inline]
    fn candidates(&self, h: Homes) -> impl Iterator<Item = usize> + '_ {
        let len = self.len;
        let wrap = move |i: usize| if i >= len { i - len } else { i };
        (0..NEIGHBORHOOD)
            .map(move |d| wrap(h.a + d))
            .chain((0..NEIGHBORHOOD).map(move |d| wrap(h.b + d)))
    }

    /// Starts loading the client's two neighborhoods into cache, so the
    /// lookup's memory latency overlaps with the rest of the decision.
    #[inline]
    pub fn prefetch(&self, key: &ClientKey) {
        #[cfg(target_arch = "x86_64")]
        {
            let h = self.homes(key);
            for i in [h.a, h.b] {
                let r = &self.records()[i];
                // SAFETY: a prefetch is only a hint; it never faults and has
                // no effect on program state. The pointer is to a live record.
                unsafe {
                    std::arch::x86_64::_mm_prefetch(
                        std::ptr::from_ref(r).cast::<i8>(),
                        std::arch::x86_64::_MM_HINT_T0,
                    );
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = key;
    }

    /// Runs `f` on the client's locked record, brought to `now`, creating
    /// it (or taking over an idle client's) if needed; a client with no
    /// record of its own gets a shared overflow record.
    #[inline]
    pub fn with<R>(&self, key: &ClientKey, now: Nanos, f: impl FnOnce(&mut WordsN<N>, Place) -> R) -> R {
        let h = self.homes(key);
        let records = self.records();
        // Both neighborhoods about a cache line at a time, so a client
        // near the start of its second neighborhood costs two memory loads
        // in parallel, not all of the first neighborhood's.
        for d in (0..NEIGHBORHOOD).step_by(Self::PER_LINE) {
            for i in [h.a + d, h.b + d]
                .into_iter()
                .flat_map(|start| start..start + Self::PER_LINE)
            {
                let r = &records[if i >= self.len { i - self.len } else { i }];
                if r.tag() == h.tag
                    && let Some(mut w) = r.lock(h.tag)
                {
                    let out = f(&mut w, Place::Own);
                    r.unlock(w);
                    return out;
                }
            }
        }
        self.claim(h, now, f)
    }

    #[cold]
    fn claim<R>(&self, h: Homes, now: Nanos, f: impl FnOnce(&mut WordsN<N>, Place) -> R) -> R {
        let records = self.records();
        // Claims of one key are serialized (a stripe of locks by tag), so
        // two first requests of a new client cannot take two records. Only
        // record locks are taken under it, and no record lock holder waits
        // for a stripe: no cycle.
        let _claiming = Stripe::lock(&self.stripes[h.tag as usize % STRIPES]);
        for i in self.candidates(h) {
            if let Some(mut w) = records[i].lock(h.tag) {
                let r = f(&mut w, Place::Own);
                records[i].unlock(w);
                return r;
            }
        }
        // A free record in the emptier neighborhood: balancing the two
        // keeps both from filling up early.
        let free = |start: usize| {
            (0..NEIGHBORHOOD)
                .filter(|d| records[(start + d) % self.len].tag() == 0)
                .count()
        };
        let h = if free(h.b) > free(h.a) {
            Homes { a: h.b, b: h.a, ..h }
        } else {
            h
        };
        for i in self.candidates(h) {
            if records[i].tag() != 0 {
                continue;
            }
            let Ok(mut w) = records[i].claim_free(h.tag) else {
                continue;
            };
            self.claimed_one();
            let r = f(&mut w, Place::Own);
            records[i].unlock(w);
            return r;
        }
        // The idle client quiet longest. Reading without the lock is only
        // a hint: idleness is checked again under it.
        let mut best: Option<(usize, u32, u64)> = None;
        for i in self.candidates(h) {
            let w = records[i].peek();
            if (self.idle)(&w, now) && best.is_none_or(|(_, _, q)| w.quiet_secs(now) > q) {
                best = Some((i, w.tag(), w.quiet_secs(now)));
            }
        }
        if let Some((i, tag, _)) = best
            && let Some(mut w) = records[i].lock(tag)
        {
            if !(self.idle)(&w, now) {
                // Busy again since the peek.
                records[i].unlock(w);
            } else {
                self.taken_over.fetch_add(1, Ordering::Relaxed);
                w.retag(h.tag);
                let r = f(&mut w, Place::Own);
                records[i].unlock(w);
                return r;
            }
        }
        self.overflowed.fetch_add(1, Ordering::Relaxed);
        let overflow = self.overflow.records();
        let o = &overflow[h.tag as usize & (overflow.len() - 1)];
        o.with_untagged(|w| f(w, Place::Overflow))
    }

    fn claimed_one(&self) {
        let n = self.claimed.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.len / 64 && self.map.bytes() >= 2 * HUGE_PAGE && !self.huge.swap(true, Ordering::Relaxed)
        {
            #[cfg(target_os = "linux")]
            {
                let map = Arc::clone(&self.map);
                // Collapsing copies the table: off the request path. If no
                // thread can be made, the table keeps its 4 KiB pages.
                let _ = std::thread::Builder::new()
                    .name("palisade-clients-thp".into())
                    .spawn(move || map.go_huge());
            }
        }
    }

    /// The client's words at this moment, if it has its own record.
    pub fn get(&self, key: &ClientKey) -> Option<WordsN<N>> {
        let h = self.homes(key);
        let records = self.records();
        self.candidates(h).find_map(|i| {
            let w = records[i].lock(h.tag)?;
            records[i].unlock(w);
            Some(w)
        })
    }

    /// Resets a client's state (admin). Returns whether it had a record.
    pub fn remove(&self, key: &ClientKey) -> bool {
        self.update(key, |w| w.retag(w.tag())).is_some()
    }

    /// Runs `f` on the client's locked record if it has one of its own;
    /// never creates one. `None` when it has none.
    pub fn update<R>(&self, key: &ClientKey, f: impl FnOnce(&mut WordsN<N>) -> R) -> Option<R> {
        let h = self.homes(key);
        let records = self.records();
        let i = self.candidates(h).find(|&i| records[i].tag() == h.tag)?;
        let mut w = records[i].lock(h.tag)?;
        let r = f(&mut w);
        records[i].unlock(w);
        Some(r)
    }

    /// Calls `f` with the words of every client that has a record (read
    /// without locks: for gauges and listings).
    pub fn for_each(&self, mut f: impl FnMut(WordsN<N>)) {
        for r in self.records() {
            if r.tag() != 0 {
                f(r.peek());
            }
        }
    }

    /// Records claimed by clients (idle ones included, until taken over).
    pub fn len(&self) -> usize {
        self.claimed.load(Ordering::Relaxed)
    }

    /// Whether no client was ever tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most clients tracked in records of their own.
    pub fn capacity(&self) -> usize {
        self.len
    }

    /// Bytes of the record array: the most the table can take, reserved at
    /// creation and made resident as clients arrive (its own mapping, not
    /// counted by the global allocator).
    pub fn bucket_bytes(&self) -> usize {
        self.map.bytes()
    }

    /// Bytes of the record array resident right now (Linux; 0 elsewhere).
    /// Reads `/proc`: for gauges and tests, not the request path.
    pub fn resident_bytes(&self) -> usize {
        #[cfg(target_os = "linux")]
        return self.map.resident();
        #[cfg(not(target_os = "linux"))]
        0
    }

    /// How many times a client had to share an overflow record.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// How many times an idle client's record went to a new client.
    pub fn taken_over(&self) -> u64 {
        self.taken_over.load(Ordering::Relaxed)
    }
}

/// One held claim stripe, released on drop.
struct Stripe<'a>(&'a AtomicBool);

impl<'a> Stripe<'a> {
    fn lock(flag: &'a AtomicBool) -> Self {
        while flag
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        Self(flag)
    }
}

impl Drop for Stripe<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// MurmurHash3's 64-bit finalizer: every input bit moves every output bit.
#[inline]
fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate::Quota;
    use palisade_core::NANOS_PER_SEC;
    use std::num::NonZeroU32;

    fn key(i: u32) -> ClientKey {
        ClientKey::V4(i.wrapping_mul(2_654_435_761))
    }

    fn quota(n: u32) -> Quota {
        Quota::per_second(NonZeroU32::new(n).unwrap())
    }

    /// One request of client `k` at `now`; whether it was admitted.
    fn hit(t: &Clients, k: u32, q: &Quota, now: Nanos) -> (bool, Place) {
        t.with(&key(k), now, |w, place| (w.check(q, now).is_ok(), place))
    }

    #[test]
    fn clients_get_their_own_records() {
        let t = Clients::new(1000);
        let q = quota(2);
        for k in 0..500 {
            assert_eq!(hit(&t, k, &q, 0), (true, Place::Own));
        }
        for k in 0..500 {
            assert_eq!(hit(&t, k, &q, 0), (true, Place::Own));
            assert!(!hit(&t, k, &q, 0).0, "client {k}");
        }
        assert_eq!((t.len(), t.overflowed()), (500, 0));
        assert!(t.remove(&key(7)));
        assert!(!t.remove(&key(10_000)));
        assert_eq!(hit(&t, 7, &q, 0), (true, Place::Own));
    }

    #[test]
    fn concurrent_requests_share_one_record() {
        for _ in 0..20 {
            let t = Clients::new(1000);
            let q = quota(1000);
            let ok: usize = std::thread::scope(|s| {
                let hs: Vec<_> = (0..4)
                    .map(|_| s.spawn(|| (0..400).filter(|&k| hit(&t, k % 100, &q, 0).0).count()))
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!((ok, t.len(), t.overflowed()), (1600, 100, 0));
            let total: u64 = (0..100)
                .map(|k| t.get(&key(k)).map_or(0, |w| w.admitted_now()))
                .sum();
            assert_eq!(total, 1600);
        }
    }

    /// A flood of fresh keys against a full table: established clients keep
    /// their records and their state, the flood shares overflow records.
    #[test]
    fn key_flood_cannot_evict_active_clients() {
        let t = Clients::new(10_000);
        let q = quota(10);
        // 5 000 established clients, each with a spent bucket.
        for k in 0..5_000 {
            for _ in 0..10 {
                hit(&t, k, &q, 0);
            }
            assert!(!hit(&t, k, &q, 0).0);
        }
        // A million new keys within the same second.
        for k in 1_000_000..2_000_000 {
            hit(&t, k, &q, 500_000_000);
        }
        assert!(t.overflowed() > 900_000, "{}", t.overflowed());
        for k in 0..5_000 {
            let (ok, place) = hit(&t, k, &q, 500_000_000);
            assert_eq!((ok, place), (false, Place::Own), "client {k} lost its state");
        }
        // Once the flood is quiet and the clients too, the table recycles.
        let later = 10 * NANOS_PER_SEC;
        let before = t.overflowed();
        let taken = t.taken_over();
        for k in 3_000_000..3_005_000 {
            assert_eq!(hit(&t, k, &q, later), (true, Place::Own));
        }
        assert_eq!(t.overflowed(), before);
        assert_eq!(t.taken_over() - taken, 5_000);
    }

    #[test]
    fn fill_overflows_little() {
        let t = Clients::new(100_000);
        let q = quota(10);
        let mut out = Vec::new();
        let mut k = 0;
        for fill in [50, 90, 100] {
            let before = t.overflowed();
            let until = t.capacity() * fill / 100;
            let start = k;
            while k < until as u32 {
                hit(&t, k, &q, 0);
                k += 1;
            }
            let share = (t.overflowed() - before) as f64 / f64::from(k - start);
            out.push((fill, share));
            println!("fill {fill} %: {:.2} % of newcomers overflowed", share * 100.0);
        }
        assert_eq!(out[0].1, 0.0);
        assert!(out[1].1 < 0.01, "{out:?}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn memory_follows() {
        // 4 M records: a 128 MiB mapping.
        let t = Clients::new(4_000_000);
        assert_eq!(t.bucket_bytes(), 128_000_000);
        assert!(
            t.resident_bytes() < 1 << 20,
            "{} resident at start",
            t.resident_bytes()
        );
        let q = quota(10);
        for k in 0..1000 {
            hit(&t, k, &q, 0);
        }
        let few = t.resident_bytes();
        // A page or two per client while sparse.
        assert!(few <= 2 * 1000 * PAGE, "{few} bytes for 1000 clients");
        for k in 1000..4_000_000 {
            hit(&t, k, &q, 0);
        }
        let full = t.resident_bytes();
        let per = full as f64 / t.len() as f64;
        println!(
            "{} clients tracked, {} overflowed: {} resident, {per:.1} B per tracked client",
            t.len(),
            t.overflowed(),
            full
        );
        assert!(per < 40.0, "{per} bytes per tracked client");
    }
}
