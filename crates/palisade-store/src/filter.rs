//! The prefilter: binary fuse filters that answer "certainly absent" for
//! most addresses not in the store, without touching the tables.
//!
//! On disk, the descriptor section holds three slots, each a 20-byte xorf
//! descriptor (padded to 24) and, after them, three fingerprint lengths:
//! * slots 0 and 1: the main filter, split in two by a key bit so both
//!   halves build in parallel (construction dominates a full rebuild);
//! * slot 2: the overlay, a small filter over the exact keys added by
//!   deltas since the main filter was built (their sorted list is stored
//!   too). A delta then rebuilds only the overlay; once the overlay grows
//!   past an eighth of the store, the next delta rebuilds everything.
//!
//! Deleted keys stay in the filters until that rebuild: they cost a false
//! positive (a table lookup), never a wrong answer.

use xorf::{BinaryFuse8, BinaryFuse8Ref, DmaSerializable as _, Filter as _, FilterRef as _};

/// Size of the descriptor section.
pub(crate) const DESC_LEN: usize = 96;
const SLOTS: usize = 3;
const SLOT: usize = 24;
const LENS_AT: usize = SLOTS * SLOT;

/// Which main shard a key belongs to.
#[inline]
pub(crate) fn shard_of(key: u64) -> usize {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 63) as usize
}

/// The filters of an open snapshot, borrowing its bytes.
pub(crate) struct Filters<'a> {
    main: [BinaryFuse8Ref<'a>; 2],
    overlay: Option<BinaryFuse8Ref<'a>>,
}

impl<'a> Filters<'a> {
    /// Checks and wraps the filter sections. Every descriptor is checked
    /// against its fingerprints so that no key can index out of bounds.
    pub fn parse(desc: &'a [u8], fingerprints: &'a [u8]) -> Result<Self, &'static str> {
        if desc.len() != DESC_LEN {
            return Err("filter descriptor section has the wrong size");
        }
        let mut lens = [0usize; SLOTS];
        for (i, len) in lens.iter_mut().enumerate() {
            let at = LENS_AT + 8 * i;
            let raw = u64::from_le_bytes(desc[at..at + 8].try_into().map_err(|_| "filter lengths")?);
            *len = usize::try_from(raw).map_err(|_| "filter length overflows")?;
        }
        if lens.iter().try_fold(0usize, |a, &l| a.checked_add(l)) != Some(fingerprints.len()) {
            return Err("filter lengths do not add up to the filter section");
        }
        let mut at = 0;
        let mut slots: [Option<BinaryFuse8Ref<'a>>; SLOTS] = [None, None, None];
        for (i, slot) in slots.iter_mut().enumerate() {
            let part = &fingerprints[at..at + lens[i]];
            at += lens[i];
            if part.is_empty() {
                continue;
            }
            let d = &desc[i * SLOT..i * SLOT + BinaryFuse8::DESCRIPTOR_LEN];
            let word = |o: usize| u32::from_le_bytes([d[o], d[o + 1], d[o + 2], d[o + 3]]);
            let (seg_len, mask, count_len) = (word(8), word(12), word(16));
            let max_index = u64::from(count_len) + 2 * u64::from(seg_len);
            if !seg_len.is_power_of_two() || mask != seg_len - 1 || max_index > part.len() as u64 {
                return Err("filter descriptor does not fit its fingerprints");
            }
            *slot = Some(BinaryFuse8Ref::from_dma(d, part));
        }
        let [a, b, overlay] = slots;
        Ok(Self {
            main: [
                a.ok_or("main filter half missing")?,
                b.ok_or("main filter half missing")?,
            ],
            overlay,
        })
    }

    /// False only when `key` is certainly not an exact key of the store.
    #[inline]
    pub fn maybe(&self, key: u64) -> bool {
        self.main[shard_of(key)].contains(&key) || self.overlay.as_ref().is_some_and(|o| o.contains(&key))
    }
}

/// Filter contents to write.
pub(crate) struct Parts<'a> {
    /// Main halves: (descriptor, fingerprints); borrowed when reused.
    pub main: [(Vec<u8>, std::borrow::Cow<'a, [u8]>); 2],
    /// The overlay filter, if any keys were added since `main`.
    pub overlay: Option<BinaryFuse8>,
    /// The overlay's keys, sorted.
    pub overlay_keys: Vec<u64>,
}

impl Parts<'_> {
    /// Total fingerprint bytes.
    pub fn len(&self) -> usize {
        self.main.iter().map(|m| m.1.len()).sum::<usize>()
            + self.overlay.as_ref().map_or(0, |o| o.fingerprints.len())
    }

    /// The descriptor section.
    pub fn descriptors(&self) -> [u8; DESC_LEN] {
        let mut out = [0u8; DESC_LEN];
        for (i, (d, f)) in self.main.iter().enumerate() {
            out[i * SLOT..i * SLOT + d.len()].copy_from_slice(d);
            out[LENS_AT + 8 * i..LENS_AT + 8 * i + 8].copy_from_slice(&(f.len() as u64).to_le_bytes());
        }
        if let Some(o) = &self.overlay {
            let i = 2;
            o.dma_copy_descriptor_to(&mut out[i * SLOT..i * SLOT + BinaryFuse8::DESCRIPTOR_LEN]);
            out[LENS_AT + 8 * i..LENS_AT + 8 * i + 8]
                .copy_from_slice(&(o.fingerprints.len() as u64).to_le_bytes());
        }
        out
    }

    /// Every fingerprint byte, in slot order.
    pub fn fingerprints(&self) -> impl Iterator<Item = &[u8]> {
        self.main
            .iter()
            .map(|m| &*m.1)
            .chain(self.overlay.as_ref().map(|o| &*o.fingerprints))
    }
}

/// Builds the main halves from all exact keys (one thread each).
pub(crate) fn build_main(shards: [Vec<u64>; 2]) -> Option<[(Vec<u8>, Vec<u8>); 2]> {
    let [a, b] = std::thread::scope(|s| {
        shards
            .map(|keys| s.spawn(move || BinaryFuse8::try_from(&keys).ok()))
            .map(|h| h.join().ok().flatten())
    });
    let take = |f: BinaryFuse8| {
        let mut d = vec![0u8; BinaryFuse8::DESCRIPTOR_LEN];
        f.dma_copy_descriptor_to(&mut d);
        (d, f.fingerprints.into_vec())
    };
    Some([take(a?), take(b?)])
}

/// The descriptor and fingerprints of main half `i` of a parsed section.
pub(crate) fn main_half(desc: &[u8], fingerprints: &[u8], i: usize) -> (Vec<u8>, std::ops::Range<usize>) {
    let len = |s: usize| {
        let at = LENS_AT + 8 * s;
        desc[at..at + 8]
            .try_into()
            .map_or(0, |b| u64::from_le_bytes(b) as usize)
    };
    let start = if i == 0 { 0 } else { len(0) };
    let end = (start + len(i)).min(fingerprints.len());
    (
        desc[i * SLOT..i * SLOT + BinaryFuse8::DESCRIPTOR_LEN].to_vec(),
        start..end,
    )
}
