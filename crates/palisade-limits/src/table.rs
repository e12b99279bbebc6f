//! A bounded, sharded table of per-client state.
//!
//! Each shard is a small hash index over a slab preallocated at construction,
//! behind its own `RwLock`; the hot path (a client already tracked) takes one
//! shard read lock and then works on the slot's atomics, so there is no global
//! lock and no allocation per request.
//!
//! Memory is fixed: at most `capacity` clients are tracked. A slot is reused
//! only when forgetting it loses nothing ([`Slot::is_idle`]: its state is the
//! same as a fresh one), so an evicted abuser never comes back with a full
//! bucket or a clean score. When the table is full of live clients, a new
//! client is charged to one of a fixed set of shared *overflow* slots picked
//! by hash: errors there make limits stricter (clients share a budget), never
//! looser.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use palisade_core::{ClientKey, Nanos};

/// Per-client state kept in a [`ClientTable`]. Interior mutability only.
pub trait Slot: Default + Send + Sync {
    /// True when this slot behaves exactly like a fresh one at `now`, so it
    /// may be forgotten.
    fn is_idle(&self, now: Nanos) -> bool;
    /// Back to the fresh state, before the slot is given to another client.
    fn reset(&self);
}

/// How many slots the eviction hand looks at before giving up.
const EVICTION_SCAN: usize = 32;

/// A bounded map from [`ClientKey`] to a [`Slot`].
pub struct ClientTable<S> {
    shards: Box<[RwLock<Shard<S>>]>,
    overflow: Box<[S]>,
    hasher: foldhash::fast::RandomState,
    shard_bits: u32,
    capacity: usize,
    overflowed: AtomicU64,
}

struct Shard<S> {
    index: HashMap<ClientKey, u32, foldhash::fast::RandomState>,
    slots: Vec<(ClientKey, S)>,
    capacity: usize,
    hand: usize,
}

/// Where a client's state lives.
pub enum Entry<'a, S> {
    /// The client's own slot, held under its shard's read lock.
    Own(OwnSlot<'a, S>),
    /// A shared overflow slot: the table was full of live clients.
    Overflow(&'a S),
}

/// A tracked client's slot, borrowed under its shard's read lock.
pub struct OwnSlot<'a, S> {
    guard: RwLockReadGuard<'a, Shard<S>>,
    index: usize,
}

impl<S> std::ops::Deref for OwnSlot<'_, S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.guard.slots[self.index].1
    }
}

impl<S> std::ops::Deref for Entry<'_, S> {
    type Target = S;
    fn deref(&self) -> &S {
        match self {
            Self::Own(own) => own,
            Self::Overflow(slot) => slot,
        }
    }
}

impl<S: Slot> ClientTable<S> {
    /// A table tracking at most `capacity` clients (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // Enough shards to keep two cores apart, not so many that tiny tables
        // waste slack: ~1024 clients per shard, 1..=64 shards.
        let shard_count = (capacity / 1024).clamp(1, 64).next_power_of_two();
        let per_shard = capacity.div_ceil(shard_count);
        let hasher = foldhash::fast::RandomState::default();
        let shards = (0..shard_count)
            .map(|_| {
                RwLock::new(Shard {
                    index: HashMap::with_capacity_and_hasher(per_shard, hasher.clone()),
                    slots: Vec::with_capacity(per_shard),
                    capacity: per_shard,
                    hand: 0,
                })
            })
            .collect();
        let overflow_len = (capacity / 64).clamp(16, 4096).next_power_of_two();
        Self {
            shards,
            overflow: (0..overflow_len).map(|_| S::default()).collect(),
            hasher,
            shard_bits: shard_count.trailing_zeros(),
            capacity: shard_count * per_shard,
            overflowed: AtomicU64::new(0),
        }
    }

    /// The client's slot, created (or recycled from an idle client) if needed.
    pub fn entry(&self, key: &ClientKey, now: Nanos) -> Entry<'_, S> {
        let hash = self.hasher.hash_one(key);
        let shard = &self.shards[shard_of(hash, self.shard_bits)];
        {
            let guard = read(shard);
            if let Some(&i) = guard.index.get(key) {
                return Entry::Own(OwnSlot {
                    guard,
                    index: i as usize,
                });
            }
        }
        {
            let mut guard = shard.write().unwrap_or_else(|p| p.into_inner());
            if !guard.index.contains_key(key) && guard.insert(*key, now).is_none() {
                drop(guard);
                self.overflowed.fetch_add(1, Ordering::Relaxed);
                // The low bits picked the shard; use the high ones here.
                let i = (hash >> 32) as usize & (self.overflow.len() - 1);
                return Entry::Overflow(&self.overflow[i]);
            }
        }
        // Inserted (or raced with another inserter); the key is present now
        // unless a concurrent eviction already recycled it, which needs the
        // slot to be idle: then a fresh lookup is as good as any.
        let guard = read(shard);
        match guard.index.get(key) {
            Some(&i) => Entry::Own(OwnSlot {
                guard,
                index: i as usize,
            }),
            None => {
                let i = (hash >> 32) as usize & (self.overflow.len() - 1);
                Entry::Overflow(&self.overflow[i])
            }
        }
    }

    /// Runs `f` on the client's slot if it is tracked, without creating it.
    pub fn get<R>(&self, key: &ClientKey, f: impl FnOnce(&S) -> R) -> Option<R> {
        let hash = self.hasher.hash_one(key);
        let guard = read(&self.shards[shard_of(hash, self.shard_bits)]);
        guard.index.get(key).map(|&i| f(&guard.slots[i as usize].1))
    }

    /// Forgets a client (admin reset).
    pub fn remove(&self, key: &ClientKey) -> bool {
        let hash = self.hasher.hash_one(key);
        let guard = self.shards[shard_of(hash, self.shard_bits)]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let Some(i) = guard.index.get(key).copied() else {
            return false;
        };
        // Reset in place and leave the slot to be recycled: the slab never
        // moves, so indices held by the map stay valid.
        guard.slots[i as usize].1.reset();
        true
    }

    /// Number of clients tracked in own slots.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| read(s).slots.len()).sum()
    }

    /// Whether no client is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The maximum number of clients tracked in own slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many times a new client had to share an overflow slot.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// Calls `f` for every tracked client (admin listings). Holds one shard
    /// lock at a time.
    pub fn for_each(&self, mut f: impl FnMut(&ClientKey, &S)) {
        for shard in self.shards.iter() {
            for (k, s) in read(shard).slots.iter() {
                f(k, s);
            }
        }
    }
}

impl<S: Slot> Shard<S> {
    /// Adds `key`; returns `None` when every slot holds a live client.
    fn insert(&mut self, key: ClientKey, now: Nanos) -> Option<usize> {
        if self.slots.len() < self.capacity {
            let i = self.slots.len();
            self.slots.push((key, S::default()));
            self.index.insert(key, u32::try_from(i).ok()?);
            return Some(i);
        }
        // CLOCK-style hand: look at a bounded number of slots from where the
        // last search stopped, take the first one that is idle.
        for _ in 0..EVICTION_SCAN.min(self.slots.len()) {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            let (old, slot) = &mut self.slots[i];
            if slot.is_idle(now) {
                self.index.remove(old);
                slot.reset();
                *old = key;
                self.index.insert(key, u32::try_from(i).ok()?);
                return Some(i);
            }
        }
        None
    }
}

fn shard_of(hash: u64, bits: u32) -> usize {
    if bits == 0 {
        0
    } else {
        (hash >> (64 - bits)) as usize
    }
}

fn read<S>(lock: &RwLock<S>) -> RwLockReadGuard<'_, S> {
    // A panic while holding a shard lock cannot leave a slot half-written
    // (slots are atomics), so a poisoned lock is still usable.
    lock.read().unwrap_or_else(|p| p.into_inner())
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

    fn touch(t: &ClientTable<Busy>, k: u32, now: Nanos, until: Nanos) -> bool {
        let e = t.entry(&key(k), now);
        e.busy_until.store(until, Ordering::Relaxed);
        e.hits.fetch_add(1, Ordering::Relaxed);
        matches!(e, Entry::Own(_))
    }

    #[test]
    fn tracks_up_to_capacity_then_overflows() {
        let t = ClientTable::<Busy>::new(8);
        for k in 0..8 {
            assert!(touch(&t, k, 0, 100));
        }
        assert_eq!(t.len(), 8);
        // All live: the ninth shares an overflow slot.
        assert!(!touch(&t, 99, 0, 100));
        assert_eq!(t.overflowed(), 1);
        assert_eq!(t.len(), 8);
        // Existing clients keep their state.
        assert_eq!(t.get(&key(3), |s| s.hits.load(Ordering::Relaxed)), Some(1));
    }

    #[test]
    fn recycles_only_idle_slots() {
        let t = ClientTable::<Busy>::new(4);
        for k in 0..4 {
            touch(&t, k, 0, if k == 2 { 10 } else { 1000 });
        }
        // At t=50 only client 2 is idle: the newcomer takes its slot.
        assert!(touch(&t, 7, 50, 1000));
        assert_eq!(t.get(&key(2), |_| ()), None);
        assert_eq!(t.get(&key(7), |s| s.hits.load(Ordering::Relaxed)), Some(1));
        for k in [0, 1, 3] {
            assert!(t.get(&key(k), |_| ()).is_some(), "live client {k} was evicted");
        }
    }

    #[test]
    fn remove_resets_state() {
        let t = ClientTable::<Busy>::new(4);
        touch(&t, 1, 0, 1000);
        assert!(t.remove(&key(1)));
        assert_eq!(t.get(&key(1), |s| s.hits.load(Ordering::Relaxed)), Some(0));
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
        assert!(t.len() <= t.capacity());
        assert!(t.capacity() < 10_100);
    }
}
