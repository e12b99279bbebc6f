//! A bounded, lock-free table of per-client state.
//!
//! One open-addressed array of cache-line-sized buckets, reserved once and
//! made resident as clients arrive.
//! A bucket holds a 64-bit tag (a seeded hash of the client key) next to the
//! client's atomics, so finding a tracked client usually costs one cache
//! line. A key lives within [`NEIGHBORHOOD`] buckets of its home position;
//! buckets are claimed with a compare-and-swap on the tag. No locks anywhere.
//!
//! Memory is fixed: at most `max_clients` buckets are claimed at once. A
//! client is forgotten only when that loses nothing ([`Slot::is_idle`]: its
//! state equals a fresh one), so an evicted abuser never comes back with a
//! full bucket or a clean score. At the cap, a newcomer takes over an idle
//! client's bucket near its home, or a sweeping hand frees one elsewhere.
//! When no client is idle, the newcomer is charged to one of a fixed set of
//! shared *overflow* slots picked by hash: clients there share a budget,
//! which makes limits stricter, never looser.
//!
//! Two clients whose 64-bit seeded tags collide would share state (again:
//! stricter). At 10⁶ tracked clients the odds are about 3·10⁻⁸, and the seed
//! is per process, so collisions cannot be aimed.

use std::hash::BuildHasher;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use palisade_core::{ClientKey, Nanos};

/// A type for which all-zero bytes are a valid value, equal to its
/// `Default`: tables are fresh anonymous memory, which the kernel zeroes.
///
/// # Safety
/// All-zero bytes must be a valid value of the type, equal to `Default`.
/// Structs made only of atomic integers qualify.
pub unsafe trait Zeroable {}

/// Per-client state kept in a [`ClientTable`]. Interior mutability only.
pub trait Slot: Default + Send + Sync + Zeroable {
    /// True when this slot behaves exactly like a fresh one at `now`, so it
    /// may be forgotten.
    fn is_idle(&self, now: Nanos) -> bool;
    /// Back to the fresh state, before the slot is given to another client.
    fn reset(&self);
}

/// How far from its home bucket a key may live.
pub const NEIGHBORHOOD: usize = 16;
/// Buckets the eviction hand looks at to free one.
const EVICTION_SWEEP: usize = 64;

const EMPTY: u64 = 0;
/// A bucket being handed from one client to another.
const MOVING: u64 = 1;

#[repr(C, align(64))]
struct Bucket<S> {
    tag: AtomicU64,
    state: S,
}

/// A bounded map from [`ClientKey`] to a [`Slot`].
pub struct ClientTable<S> {
    buckets: Buckets<S>,
    mask: usize,
    /// `64 - log2(buckets.len())`: home positions come from the top bits.
    shift: u32,
    max_clients: usize,
    claimed: AtomicUsize,
    overflow: Box<[S]>,
    overflowed: AtomicU64,
    hand: AtomicUsize,
    hasher: foldhash::fast::RandomState,
}

/// The bucket array: `len` zeroed buckets in one anonymous mapping.
///
/// Memory follows clients: the mapping is faulted in 4 KiB pages as buckets
/// are first written, and huge pages are refused while the table is sparse
/// (faulting in a zeroed 2 MiB page per new client on the request path once
/// stalled a burst of new clients: 324 requests in 2 s). Lookups land on
/// random buckets, so once `len / 64` buckets are claimed (nearly every
/// page touched anyway) the table is advised for huge pages, which the
/// kernel's khugepaged then collapses it into, and lookups in a table of
/// millions of clients stop missing the TLB.
struct Buckets<S> {
    ptr: NonNull<Bucket<S>>,
    len: usize,
    /// Set once the table has asked for huge pages.
    huge: std::sync::atomic::AtomicBool,
    /// The whole mapping (alignment slack included), for `munmap`.
    map: *mut libc::c_void,
    map_len: usize,
}

const HUGE_PAGE: usize = 2 << 20;

impl<S: Slot> Buckets<S> {
    fn zeroed(len: usize) -> Self {
        let bytes = len
            .checked_mul(size_of::<Bucket<S>>())
            .filter(|&b| b <= isize::MAX as usize - HUGE_PAGE);
        let Some(bytes) = bytes else {
            // Only reachable with absurd sizes, which config validation refuses.
            panic!("client table of {len} buckets does not fit in memory");
        };
        let huge = bytes >= HUGE_PAGE;
        let map_len = if huge { bytes + HUGE_PAGE } else { bytes };
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            let Ok(layout) = std::alloc::Layout::array::<Bucket<S>>(len) else {
                panic!("client table of {len} buckets does not fit in memory");
            };
            std::alloc::handle_alloc_error(layout);
        }
        let start = if huge {
            (map as usize).next_multiple_of(HUGE_PAGE)
        } else {
            map as usize
        };
        #[cfg(target_os = "linux")]
        // SAFETY: the range lies inside the mapping just made; the advice
        // only changes how the kernel backs it. Failure (THP not built in)
        // leaves 4 KiB pages, which is what is asked for.
        unsafe {
            libc::madvise(start as *mut libc::c_void, bytes, libc::MADV_NOHUGEPAGE);
        }
        let Some(ptr) = NonNull::new(start as *mut Bucket<S>) else {
            unreachable!("mmap succeeded, so the mapping is not at address 0");
        };
        Self {
            ptr,
            len,
            huge: std::sync::atomic::AtomicBool::new(false),
            map,
            map_len,
        }
    }

    /// Asks for huge pages once the table is dense enough to fill them.
    fn grown_to(&self, claimed: usize) {
        let bytes = self.len * size_of::<Bucket<S>>();
        if claimed >= self.len / 64 && bytes >= 2 * HUGE_PAGE && !self.huge.swap(true, Ordering::Relaxed) {
            #[cfg(target_os = "linux")]
            // SAFETY: the range is the bucket array inside our live mapping;
            // advice does not change contents.
            unsafe {
                libc::madvise(self.ptr.as_ptr().cast(), bytes, libc::MADV_HUGEPAGE);
            }
        }
    }
}

impl<S> std::ops::Deref for Buckets<S> {
    type Target = [Bucket<S>];

    fn deref(&self) -> &[Bucket<S>] {
        // SAFETY: `ptr` is page-aligned (so 64-byte aligned) and points to
        // `len` buckets inside our live mapping. Anonymous mappings read as
        // zeroes, and all-zero bytes are a valid `Bucket<S>` (an AtomicU64
        // and `S: Zeroable`). Buckets are only changed through atomics.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<S> Drop for Buckets<S> {
    fn drop(&mut self) {
        if std::mem::needs_drop::<Bucket<S>>() {
            // SAFETY: the `len` buckets are initialised (see `deref`) and
            // dropped once, here; nothing uses them afterwards.
            unsafe {
                std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len));
            }
        }
        // SAFETY: unmaps exactly the mapping made in `zeroed`; no reference
        // into it outlives `self`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

// SAFETY: `Buckets` owns its mapping like a `Box<[Bucket<S>]>` would, and
// buckets are shared only through `&`, their fields being atomics.
unsafe impl<S: Send> Send for Buckets<S> {}
// SAFETY: as above; `&Buckets` gives only `&Bucket<S>`, which is `Sync`
// when `S` is.
unsafe impl<S: Sync> Sync for Buckets<S> {}

impl<S: Slot> ClientTable<S> {
    /// A table tracking at most `max_clients` clients (at least 1).
    pub fn new(max_clients: usize) -> Self {
        let max_clients = max_clients.max(1);
        // At most ~80 % full when every client is tracked, so neighborhoods
        // rarely fill up before the table does.
        let len = (max_clients + max_clients / 4)
            .next_power_of_two()
            .max(NEIGHBORHOOD);
        let overflow_len = (max_clients / 64).clamp(16, 4096).next_power_of_two();
        Self {
            buckets: Buckets::zeroed(len),
            mask: len - 1,
            shift: 64 - len.trailing_zeros(),
            max_clients,
            claimed: AtomicUsize::new(0),
            overflow: (0..overflow_len).map(|_| S::default()).collect(),
            overflowed: AtomicU64::new(0),
            hand: AtomicUsize::new(0),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Runs `f` on the client's slot, creating it (or recycling an idle
    /// client's) if needed. `f` may run twice if the slot was recycled
    /// while `f` ran; the result of the run on the right slot is returned.
    #[inline]
    pub fn with<R>(&self, key: &ClientKey, now: Nanos, f: impl Fn(&S) -> R) -> R {
        let tag = self.tag(key);
        loop {
            let Some(i) = self.find(tag).or_else(|| self.claim(tag, now)) else {
                self.overflowed.fetch_add(1, Ordering::Relaxed);
                return f(&self.overflow[(tag >> 32) as usize & (self.overflow.len() - 1)]);
            };
            let bucket = &self.buckets[i];
            let r = f(&bucket.state);
            if bucket.tag.load(Ordering::Acquire) == tag {
                return r;
            }
            // The bucket went to another client while we used it (it was
            // idle, so we lose nothing by starting over).
        }
    }

    /// Starts loading the client's home bucket into cache. A decision looks
    /// a client up in several tables; prefetching them all first lets their
    /// memory latencies overlap instead of adding up.
    #[inline]
    pub fn prefetch(&self, key: &ClientKey) {
        #[cfg(target_arch = "x86_64")]
        {
            let bucket = &self.buckets[self.home(self.tag(key)) & self.mask];
            // SAFETY: a prefetch is only a hint; it never faults and has no
            // effect on program state. The pointer is to a live bucket.
            unsafe {
                std::arch::x86_64::_mm_prefetch(
                    std::ptr::from_ref(bucket).cast::<i8>(),
                    std::arch::x86_64::_MM_HINT_T0,
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = key;
    }

    /// Runs `f` on the client's slot if it is tracked, without creating it.
    pub fn get<R>(&self, key: &ClientKey, f: impl FnOnce(&S) -> R) -> Option<R> {
        self.find(self.tag(key)).map(|i| f(&self.buckets[i].state))
    }

    /// Runs `f` on the client's slot, or on the overflow slot it would share
    /// when untracked; never creates a slot. For undoing what an earlier
    /// [`with`](Self::with) did.
    pub fn get_or_overflow<R>(&self, key: &ClientKey, f: impl FnOnce(&S) -> R) -> R {
        let tag = self.tag(key);
        match self.find(tag) {
            Some(i) => f(&self.buckets[i].state),
            None => f(&self.overflow[(tag >> 32) as usize & (self.overflow.len() - 1)]),
        }
    }

    /// Resets a client's state (admin). Returns whether it was tracked.
    pub fn remove(&self, key: &ClientKey) -> bool {
        self.get(key, S::reset).is_some()
    }

    /// Buckets claimed by clients (idle ones included, until recycled).
    pub fn len(&self) -> usize {
        self.claimed.load(Ordering::Relaxed)
    }

    /// Whether no client was ever tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most clients tracked in own slots.
    pub fn capacity(&self) -> usize {
        self.max_clients
    }

    /// Bytes of the bucket array: the most this table's clients can take,
    /// reserved at creation, made resident as clients arrive (not counted
    /// by the global allocator: it is its own mapping).
    pub fn bucket_bytes(&self) -> usize {
        self.buckets.len() * size_of::<Bucket<S>>()
    }

    /// How many times a new client had to share an overflow slot.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// Calls `f` for every tracked client's state (admin, gauges).
    pub fn for_each(&self, mut f: impl FnMut(&S)) {
        for b in self.buckets.iter() {
            if b.tag.load(Ordering::Acquire) > MOVING {
                f(&b.state);
            }
        }
    }

    /// Where a tag's neighborhood starts. The hasher's low bits are weak
    /// for sequential keys (long runs of full buckets were seen), so the tag
    /// is spread by a Fibonacci multiply and the top bits taken.
    #[inline]
    fn home(&self, tag: u64) -> usize {
        (tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    #[inline]
    fn tag(&self, key: &ClientKey) -> u64 {
        // 0 and 1 are reserved markers.
        self.hasher.hash_one(key).max(MOVING + 1)
    }

    /// A bucket's tag, waiting out a hand-over in progress (a few stores).
    #[inline]
    fn settled(&self, i: usize) -> u64 {
        loop {
            let t = self.buckets[i].tag.load(Ordering::Acquire);
            if t != MOVING {
                return t;
            }
            std::hint::spin_loop();
        }
    }

    #[inline]
    fn find(&self, tag: u64) -> Option<usize> {
        let home = self.home(tag);
        for d in 0..NEIGHBORHOOD {
            let i = (home + d) & self.mask;
            // No early exit at an empty bucket: once the table holds
            // `max_clients`, a newcomer may take over an idle client's
            // bucket beyond an empty one.
            if self.settled(i) == tag {
                return Some(i);
            }
        }
        None
    }

    #[cold]
    fn claim(&self, tag: u64, now: Nanos) -> Option<usize> {
        let home = self.home(tag);
        for attempt in 0..2 {
            // A free bucket nearby, while under the cap.
            let mut saw_empty = false;
            for d in 0..NEIGHBORHOOD {
                let i = (home + d) & self.mask;
                match self.settled(i) {
                    t if t == tag => return Some(i),
                    EMPTY => {
                        saw_empty = true;
                        if !self.reserve() {
                            break;
                        }
                        match self.buckets[i].tag.compare_exchange(
                            EMPTY,
                            tag,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        ) {
                            Ok(_) => return Some(i),
                            Err(t) => {
                                self.claimed.fetch_sub(1, Ordering::AcqRel);
                                if t == tag {
                                    return Some(i);
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            // An idle client's bucket nearby.
            for d in 0..NEIGHBORHOOD {
                let i = (home + d) & self.mask;
                if let Some(i) = self.take_over(i, tag, now) {
                    return Some(i);
                }
            }
            // At the cap with free buckets nearby: forget an idle client
            // elsewhere, then try again once.
            if attempt > 0 || !saw_empty || !self.free_one(now) {
                break;
            }
        }
        None
    }

    /// Counts one more claimed bucket, unless at the cap.
    fn reserve(&self) -> bool {
        let n = self.claimed.fetch_add(1, Ordering::AcqRel);
        if n < self.max_clients {
            self.buckets.grown_to(n + 1);
            return true;
        }
        self.claimed.fetch_sub(1, Ordering::AcqRel);
        false
    }

    /// Hands bucket `i` to `tag` if its client is idle (or already `tag`).
    fn take_over(&self, i: usize, tag: u64, now: Nanos) -> Option<usize> {
        let t = self.settled(i);
        if t == tag {
            return Some(i);
        }
        self.evict(i, t, now, tag).then_some(i)
    }

    /// Replaces bucket `i`'s client (tag `t`) with `next` if it is idle.
    fn evict(&self, i: usize, t: u64, now: Nanos, next: u64) -> bool {
        let b = &self.buckets[i];
        if t <= MOVING || !b.state.is_idle(now) {
            return false;
        }
        if b.tag
            .compare_exchange(t, MOVING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        // Re-check under the marker: a request may have landed meanwhile.
        if !b.state.is_idle(now) {
            b.tag.store(t, Ordering::Release);
            return false;
        }
        b.state.reset();
        b.tag.store(next, Ordering::Release);
        true
    }

    /// Frees one idle client's bucket, found by a hand sweeping the table.
    fn free_one(&self, now: Nanos) -> bool {
        let start = self.hand.fetch_add(EVICTION_SWEEP, Ordering::Relaxed);
        for i in start..start + EVICTION_SWEEP {
            let i = i & self.mask;
            let t = self.settled(i);
            if self.evict(i, t, now, EMPTY) {
                self.claimed.fetch_sub(1, Ordering::AcqRel);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// A slot that is idle once `busy_until` has passed.
    #[derive(Default)]
    struct Busy {
        busy_until: AtomicU64,
        hits: AtomicU64,
    }

    // SAFETY: two atomic integers.
    unsafe impl Zeroable for Busy {}

    impl Slot for Busy {
        fn is_idle(&self, now: Nanos) -> bool {
            self.busy_until.load(Ordering::Relaxed) <= now
        }
        fn reset(&self) {
            self.busy_until.store(0, Ordering::Relaxed);
            self.hits.store(0, Ordering::Relaxed);
        }
    }

    fn key(i: u32) -> ClientKey {
        ClientKey::V4(i)
    }

    fn touch(t: &ClientTable<Busy>, k: u32, now: Nanos, until: Nanos) -> u64 {
        t.with(&key(k), now, |s| {
            s.busy_until.store(until, Ordering::Relaxed);
            s.hits.fetch_add(1, Ordering::Relaxed) + 1
        })
    }

    fn hits(t: &ClientTable<Busy>, k: u32) -> Option<u64> {
        t.get(&key(k), |s| s.hits.load(Ordering::Relaxed))
    }

    #[test]
    fn tracks_up_to_capacity_then_overflows() {
        let t = ClientTable::<Busy>::new(8);
        for k in 0..8 {
            assert_eq!(touch(&t, k, 0, 100), 1);
        }
        assert_eq!(t.len(), 8);
        // All live: the ninth shares an overflow slot.
        touch(&t, 99, 0, 100);
        assert_eq!(t.overflowed(), 1);
        assert_eq!(t.len(), 8);
        assert_eq!(hits(&t, 99), None);
        // Existing clients keep their state.
        assert_eq!(touch(&t, 3, 0, 100), 2);
    }

    #[test]
    fn recycles_only_idle_slots() {
        let t = ClientTable::<Busy>::new(4);
        for k in 0..4 {
            touch(&t, k, 0, if k == 2 { 10 } else { 1000 });
        }
        // At t=50 only client 2 is idle: the newcomer takes its slot.
        assert_eq!(touch(&t, 7, 50, 1000), 1);
        assert_eq!(hits(&t, 2), None);
        assert_eq!(hits(&t, 7), Some(1));
        for k in [0, 1, 3] {
            assert_eq!(hits(&t, k), Some(1), "live client {k} was evicted");
        }
        assert_eq!(t.overflowed(), 0);
    }

    #[test]
    fn remove_resets_state() {
        let t = ClientTable::<Busy>::new(4);
        touch(&t, 1, 0, 1000);
        assert!(t.remove(&key(1)));
        assert_eq!(hits(&t, 1), Some(0));
        assert!(!t.remove(&key(2)));
    }

    #[test]
    fn million_keys_stay_bounded() {
        let t = ClientTable::<Busy>::new(10_000);
        for k in 0..1_000_000u32 {
            // Every client stays live for 10 "ticks": the table must churn
            // through idle ones and never grow.
            touch(&t, k, Nanos::from(k), Nanos::from(k) + 10);
        }
        assert!(t.len() <= 10_000);
        assert_eq!(t.capacity(), 10_000);
        // Churning through idle clients, almost nobody had to overflow.
        assert!(t.overflowed() < 10_000, "{}", t.overflowed());
    }

    #[test]
    fn concurrent_clients_each_get_their_own_slot() {
        // Many rounds: each table has its own hash seed, and a weak seed
        // once clustered sequential keys into overflow.
        for round in 0..50 {
            let t = ClientTable::<Busy>::new(1000);
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for k in 0..500 {
                            touch(&t, k, 0, 1000);
                        }
                    });
                }
            });
            assert_eq!((round, t.len(), t.overflowed()), (round, 500, 0));
            for k in 0..500 {
                assert_eq!(hits(&t, k), Some(4), "client {k}");
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_big_table_is_resident_only_as_clients_arrive() {
        // 2²¹ buckets of 64 bytes: a 128 MiB mapping.
        let t = ClientTable::<Busy>::new(1_000_000);
        assert_eq!(t.bucket_bytes(), 128 << 20);
        let (lo, hi) = (
            t.buckets.ptr.as_ptr() as usize,
            t.buckets.ptr.as_ptr() as usize + t.bucket_bytes(),
        );
        let created = crate::clients::resident_in(lo, hi);
        assert!(created < 1 << 20, "{created} bytes resident at creation");
        for k in 0..1000 {
            touch(&t, k, 0, 1);
        }
        let few = crate::clients::resident_in(lo, hi);
        assert!(few <= 1000 * 2 * 4096, "{few} bytes for 1000 clients");
        for k in 1000..1_000_000 {
            touch(&t, k, 0, 1);
        }
        assert_eq!(t.len() as u64 + t.overflowed(), 1_000_000);
        let full = crate::clients::resident_in(lo, hi);
        assert!(full <= t.bucket_bytes() + (2 << 20), "{full} bytes resident");
    }
}
