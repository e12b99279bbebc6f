//! The snapshot file: a fixed little-endian layout that is memory-mapped
//! and queried in place.
//!
//! ```text
//! header (128 bytes): magic, version, counts, watermark, CRC-32 of the body, CRC-32 of the header
//! body, each section 16-byte aligned:
//!   v4_offsets  u32 × 65 537     start of each /16 in v4_low
//!   v4_low      u16 × n4         low 16 bits, sorted within each /16
//!   v4_class    (0|1|2 B) × n4   verdict class of each address
//!   v4_prefix   8 B × p4         the prefixes as given (addr, len, class)
//!   v4_iv_*     disjoint intervals: start u32, end u32, class u16 (× m4)
//!   v4_cover    u64 × 1 024      bit per /16: does any interval touch it
//!   v6_keys     u128 × n6, v6_class, v6_prefix 32 B × p6, v6_iv_* (u128, u128, u16)
//!   classes     16 B × c         score, action, reason, expiry
//!   reasons     reason names, '\n'-separated
//!   filter      binary fuse filters: descriptors (96 B), fingerprints, overlay keys u64 (see filter.rs)
//! ```

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use bytemuck::{Pod, Zeroable};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::filter::{DESC_LEN, Filters};
use crate::{Action, Error, Result, Verdict, io_err};

pub(crate) const MAGIC: [u8; 8] = *b"PLSDSTOR";
pub(crate) const VERSION: u32 = 2;
pub(crate) const HEADER_LEN: usize = 128;
pub(crate) const BUCKETS: usize = 1 << 16;
pub(crate) const COVER_WORDS: usize = BUCKETS / 64;
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
#[repr(C)]
pub(crate) struct Header {
    pub magic: [u8; 8],
    pub version: u32,
    pub class_width: u32,
    pub watermark: u64,
    pub created_unix: u64,
    pub body_len: u64,
    pub n4: u64,
    pub p4: u64,
    pub m4: u64,
    pub n6: u64,
    pub p6: u64,
    pub m6: u64,
    pub classes: u64,
    pub reasons_len: u64,
    pub filter_len: u64,
    pub overlay_keys: u64,
    pub body_crc: u32,
    pub header_crc: u32,
}

const _: () = assert!(size_of::<Header>() == HEADER_LEN);

#[derive(Clone, Copy, Pod, Zeroable, Debug)]
#[repr(C)]
pub(crate) struct Prefix4 {
    pub addr: u32,
    pub len: u8,
    pub pad: u8,
    pub class: u16,
}

#[derive(Clone, Copy, Pod, Zeroable, Debug)]
#[repr(C)]
pub(crate) struct Prefix6 {
    pub addr: u128,
    pub len: u8,
    pub pad: [u8; 1],
    pub class: u16,
    pub pad2: [u8; 12],
}

#[derive(Clone, Copy, Pod, Zeroable, Debug)]
#[repr(C)]
pub(crate) struct ClassRec {
    pub score: u8,
    pub action: u8,
    pub reason: u16,
    pub pad: u32,
    pub expires: u64,
}

/// Byte offset (from the file start) and element count of one section.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sec {
    pub off: usize,
    pub len: usize,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Layout {
    pub v4_offsets: Sec,
    pub v4_low: Sec,
    pub v4_class: Sec,
    pub v4_prefix: Sec,
    pub v4_iv_start: Sec,
    pub v4_iv_end: Sec,
    pub v4_iv_class: Sec,
    pub v4_cover: Sec,
    pub v6_keys: Sec,
    pub v6_class: Sec,
    pub v6_prefix: Sec,
    pub v6_iv_start: Sec,
    pub v6_iv_end: Sec,
    pub v6_iv_class: Sec,
    pub classes: Sec,
    pub reasons: Sec,
    pub filter_desc: Sec,
    pub filter: Sec,
    pub overlay_keys: Sec,
    pub end: usize,
}

impl Layout {
    /// Where every section of a file with these counts lives. Writer and
    /// reader both use this, so they cannot disagree.
    pub fn of(h: &Header) -> Option<Self> {
        let mut at = HEADER_LEN;
        let mut sec = |count: u64, elem: usize| -> Option<Sec> {
            let len = usize::try_from(count).ok()?;
            let off = at.checked_next_multiple_of(16)?;
            at = off.checked_add(len.checked_mul(elem)?)?;
            Some(Sec { off, len })
        };
        let width = h.class_width as usize;
        let filter_desc = if h.filter_len > 0 { DESC_LEN as u64 } else { 0 };
        let layout = Self {
            v4_offsets: sec(BUCKETS as u64 + 1, 4)?,
            v4_low: sec(h.n4, 2)?,
            v4_class: sec(h.n4, width)?,
            v4_prefix: sec(h.p4, 8)?,
            v4_iv_start: sec(h.m4, 4)?,
            v4_iv_end: sec(h.m4, 4)?,
            v4_iv_class: sec(h.m4, 2)?,
            v4_cover: sec(COVER_WORDS as u64, 8)?,
            v6_keys: sec(h.n6, 16)?,
            v6_class: sec(h.n6, width)?,
            v6_prefix: sec(h.p6, 32)?,
            v6_iv_start: sec(h.m6, 16)?,
            v6_iv_end: sec(h.m6, 16)?,
            v6_iv_class: sec(h.m6, 2)?,
            classes: sec(h.classes, 16)?,
            reasons: sec(h.reasons_len, 1)?,
            filter_desc: sec(filter_desc, 1)?,
            filter: sec(h.filter_len, 1)?,
            overlay_keys: sec(h.overlay_keys, 8)?,
            end: 0,
        };
        Some(Self {
            end: at.checked_next_multiple_of(16)?,
            ..layout
        })
    }
}

/// The snapshot's bytes, always in private memory: a shared mapping of the
/// file would fault (SIGBUS) the moment someone truncated or rewrote it in
/// place, and would change under the checksums already verified.
/// `u128` so that every section offset (a multiple of 16) is aligned.
struct Backing {
    words: Vec<u128>,
    len: usize,
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
}

/// An immutable, queryable store. Opening reads the file once; nothing is parsed into the
/// heap except the verdict classes and reason names.
pub struct Snapshot {
    // Declared before `backing`: it borrows from it and must drop first.
    filter: Option<Filters<'static>>,
    backing: Backing,
    base: *const u8,
    layout: Layout,
    header: Header,
    classes: Vec<Verdict>,
    reasons: Vec<String>,
    source: PathBuf,
}

// SAFETY: `base` points into `backing`, which is never written after
// construction and lives as long as the snapshot.
unsafe impl Send for Snapshot {}
// SAFETY: as above; all access is read-only.
unsafe impl Sync for Snapshot {}

/// Facts about a snapshot, for `palisade store info` and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Where it came from (a path, or `(memory)`).
    pub source: String,
    /// The feed position this snapshot includes.
    pub watermark: u64,
    /// When it was built (Unix seconds).
    pub created_unix: u64,
    /// Exact IPv4 addresses.
    pub ipv4: u64,
    /// IPv4 prefixes.
    pub ipv4_prefixes: u64,
    /// Exact IPv6 addresses.
    pub ipv6: u64,
    /// IPv6 prefixes.
    pub ipv6_prefixes: u64,
    /// Distinct verdicts.
    pub classes: u64,
    /// Bytes per verdict index (0 when all exact entries share one).
    pub class_width: u32,
    /// Total size.
    pub bytes: u64,
    /// Of which the filter.
    pub filter_bytes: u64,
    /// Exact keys added by deltas since the main filter was built (they
    /// live in the overlay filter until the next full rebuild).
    pub overlay_keys: u64,
}

impl Info {
    /// Every entry, prefixes included.
    pub fn entries(&self) -> u64 {
        self.ipv4 + self.ipv4_prefixes + self.ipv6 + self.ipv6_prefixes
    }
}

fn corrupt(path: &Path, why: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_owned(),
        why: why.into(),
    }
}

fn header_crc(h: &Header) -> u32 {
    let bytes = bytemuck::bytes_of(h);
    crc32fast::hash(&bytes[..HEADER_LEN - 4])
}

impl Snapshot {
    /// Reads a snapshot file into private memory and verifies it (header,
    /// both checksums, every section inside the file). After this returns,
    /// nothing done to the file on disk (rewritten in place, truncated,
    /// deleted) can change or break the snapshot.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        let len = usize::try_from(len).map_err(|_| corrupt(path, format!("{len} bytes is too large")))?;
        let mut words = vec![0u128; len.div_ceil(16)];
        file.read_exact(&mut bytemuck::cast_slice_mut::<u128, u8>(&mut words)[..len])
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => corrupt(path, "the file shrank while it was read"),
                _ => io_err(path)(e),
            })?;
        // A writer still appending would leave a mix of two files: refuse
        // it now rather than fail a checksum with a vaguer message.
        if file.read(&mut [0u8; 1]).map_err(io_err(path))? != 0 {
            return Err(corrupt(path, "the file grew while it was read"));
        }
        Self::from_backing(Backing { words, len }, path.to_owned())
    }

    /// [`Self::open`], and with `key` also checks the snapshot may be
    /// served: signed by `key` (`path.sig`), or written there by this store
    /// itself after applying deltas.
    pub fn open_trusted(path: &Path, key: Option<&crate::sign::PublicKey>) -> Result<Self> {
        let snapshot = Self::open(path)?;
        if let Some(key) = key {
            crate::sign::check_snapshot(path, snapshot.as_bytes(), key)?;
        }
        Ok(snapshot)
    }

    /// The same snapshot, named after the file it was written to.
    pub(crate) fn named(mut self, path: &Path) -> Self {
        path.clone_into(&mut self.source);
        self
    }

    /// A snapshot from bytes in memory (checked like a file).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut words = vec![0u128; bytes.len().div_ceil(16)];
        bytemuck::cast_slice_mut::<u128, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self::from_backing(
            Backing {
                words,
                len: bytes.len(),
            },
            PathBuf::from("(memory)"),
        )
    }

    pub(crate) fn from_heap(words: Vec<u128>) -> Result<Self> {
        let len = words.len() * 16;
        Self::from_backing(Backing { words, len }, PathBuf::from("(memory)"))
    }

    fn from_backing(backing: Backing, source: PathBuf) -> Result<Self> {
        if cfg!(target_endian = "big") {
            return Err(corrupt(
                &source,
                "snapshots are little-endian; this machine is not",
            ));
        }
        let bytes = backing.bytes();
        let header: Header = bytes
            .get(..HEADER_LEN)
            .map(bytemuck::pod_read_unaligned)
            .ok_or_else(|| corrupt(&source, format!("{} bytes is shorter than a header", bytes.len())))?;
        if header.magic != MAGIC {
            return Err(corrupt(&source, "bad magic (not a Palisade store)"));
        }
        if header.version != VERSION {
            return Err(corrupt(
                &source,
                format!("format version {} (this build reads {VERSION})", header.version),
            ));
        }
        if header_crc(&header) != header.header_crc {
            return Err(corrupt(&source, "header checksum mismatch"));
        }
        if header.class_width > 2 {
            return Err(corrupt(&source, format!("class width {}", header.class_width)));
        }
        let layout = Layout::of(&header).ok_or_else(|| corrupt(&source, "section sizes overflow"))?;
        let body_end = HEADER_LEN as u64 + header.body_len;
        if layout.end as u64 != body_end || (bytes.len() as u64) < body_end {
            return Err(corrupt(
                &source,
                format!(
                    "truncated: {} bytes, header says {body_end}, sections need {}",
                    bytes.len(),
                    layout.end
                ),
            ));
        }
        let body = &bytes[HEADER_LEN..layout.end];
        if crc32fast::hash(body) != header.body_crc {
            return Err(corrupt(&source, "body checksum mismatch"));
        }
        let base = bytes.as_ptr();
        let mut snap = Self {
            filter: None,
            base,
            layout,
            header,
            classes: Vec::new(),
            reasons: Vec::new(),
            source,
            backing,
        };
        snap.validate()?;
        Ok(snap)
    }

    /// Checks that an index in the file cannot send a lookup out of bounds,
    /// and decodes the small tables.
    fn validate(&mut self) -> Result<()> {
        let path = self.source.clone();
        let offsets = self.v4_offsets();
        if offsets[0] != 0
            || offsets.windows(2).any(|w| w[0] > w[1])
            || offsets[BUCKETS] as u64 != self.header.n4
        {
            return Err(corrupt(&path, "IPv4 bucket offsets are inconsistent"));
        }
        let recs: &[ClassRec] = self.sec(self.layout.classes);
        let mut classes = Vec::with_capacity(recs.len());
        for r in recs {
            classes.push(Verdict {
                score: r.score.min(100),
                action: Action::from_u8(r.action).ok_or_else(|| corrupt(&path, "unknown action"))?,
                reason: r.reason,
                expires: r.expires,
            });
        }
        let reasons = std::str::from_utf8(self.sec::<u8>(self.layout.reasons))
            .map_err(|_| corrupt(&path, "reason table is not UTF-8"))?;
        self.reasons = if reasons.is_empty() {
            Vec::new()
        } else {
            reasons.split('\n').map(str::to_owned).collect()
        };
        if classes.iter().any(|c| usize::from(c.reason) > self.reasons.len()) {
            return Err(corrupt(&path, "a verdict names a reason that does not exist"));
        }
        if classes.is_empty() && self.header.n4 + self.header.n6 + self.header.m4 + self.header.m6 > 0 {
            return Err(corrupt(&path, "entries without verdicts"));
        }
        self.classes = classes;
        if self.header.filter_len > 0 {
            let desc: &[u8] = self.sec(self.layout.filter_desc);
            let fingerprints: &[u8] = self.sec(self.layout.filter);
            // SAFETY: the slices point into `backing`, which outlives the
            // filters (field order) and is never written.
            let (desc, fingerprints): (&'static [u8], &'static [u8]) = unsafe {
                (
                    std::slice::from_raw_parts(desc.as_ptr(), desc.len()),
                    std::slice::from_raw_parts(fingerprints.as_ptr(), fingerprints.len()),
                )
            };
            self.filter = Some(Filters::parse(desc, fingerprints).map_err(|why| corrupt(&path, why))?);
        }
        Ok(())
    }

    #[inline]
    fn sec<T: Pod>(&self, s: Sec) -> &[T] {
        debug_assert!(s.off.is_multiple_of(align_of::<T>()));
        // SAFETY: `from_backing` checked every section against the backing's
        // length (Layout::of + the end check), sections are 16-byte aligned
        // from a 16-byte-aligned base, and any bit pattern is a valid `T`.
        unsafe { std::slice::from_raw_parts(self.base.add(s.off).cast::<T>(), s.len) }
    }

    fn v4_offsets(&self) -> &[u32] {
        self.sec(self.layout.v4_offsets)
    }

    #[inline]
    fn class_at(&self, classes: Sec, i: usize) -> Option<Verdict> {
        let c = match self.header.class_width {
            0 => 0,
            1 => usize::from(*self.sec::<u8>(classes).get(i)?),
            _ => usize::from(*self.sec::<u16>(classes).get(i)?),
        };
        self.classes.get(c).copied()
    }

    #[inline]
    fn maybe(&self, key: u64) -> bool {
        self.filter.as_ref().is_none_or(|f| f.maybe(key))
    }

    /// The verdict for an address: the most specific live entry. IPv4-mapped
    /// IPv6 addresses are looked up as IPv4.
    #[inline]
    pub fn lookup(&self, ip: IpAddr, now_unix: u64) -> Option<Verdict> {
        match ip.to_canonical() {
            IpAddr::V4(a) => self.lookup_v4(u32::from(a), now_unix),
            IpAddr::V6(a) => self.lookup_v6(u128::from(a), now_unix),
        }
    }

    /// [`Self::lookup`] for an IPv4 address as a `u32`.
    #[inline]
    pub fn lookup_v4(&self, ip: u32, now_unix: u64) -> Option<Verdict> {
        if self.header.n4 != 0
            && self.maybe(u64::from(ip))
            && let Some(v) = self.exact_v4(ip)
            && v.live(now_unix)
        {
            return Some(v);
        }
        self.interval_v4(ip).filter(|v| v.live(now_unix))
    }

    #[inline]
    fn exact_v4(&self, ip: u32) -> Option<Verdict> {
        let hi = (ip >> 16) as usize;
        let offsets = self.v4_offsets();
        let (a, b) = (offsets[hi] as usize, offsets[hi + 1] as usize);
        let lows = self.sec::<u16>(self.layout.v4_low).get(a..b)?;
        let i = search_u16(lows, ip as u16)?;
        self.class_at(self.layout.v4_class, a + i)
    }

    #[inline]
    fn interval_v4(&self, ip: u32) -> Option<Verdict> {
        if self.header.m4 == 0 {
            return None;
        }
        let hi = (ip >> 16) as usize;
        let cover = self.sec::<u64>(self.layout.v4_cover);
        if cover[hi / 64] & (1 << (hi % 64)) == 0 {
            return None;
        }
        let starts = self.sec::<u32>(self.layout.v4_iv_start);
        let i = starts.partition_point(|&s| s <= ip).checked_sub(1)?;
        if ip > *self.sec::<u32>(self.layout.v4_iv_end).get(i)? {
            return None;
        }
        let c = *self.sec::<u16>(self.layout.v4_iv_class).get(i)?;
        self.classes.get(usize::from(c)).copied()
    }

    /// [`Self::lookup`] for an IPv6 address as a `u128`.
    #[inline]
    pub fn lookup_v6(&self, ip: u128, now_unix: u64) -> Option<Verdict> {
        if self.header.n6 != 0
            && self.maybe(v6_filter_key(ip))
            && let Ok(i) = self.sec::<u128>(self.layout.v6_keys).binary_search(&ip)
            && let Some(v) = self.class_at(self.layout.v6_class, i)
            && v.live(now_unix)
        {
            return Some(v);
        }
        if self.header.m6 == 0 {
            return None;
        }
        let starts = self.sec::<u128>(self.layout.v6_iv_start);
        let i = starts.partition_point(|&s| s <= ip).checked_sub(1)?;
        if ip > *self.sec::<u128>(self.layout.v6_iv_end).get(i)? {
            return None;
        }
        let c = *self.sec::<u16>(self.layout.v6_iv_class).get(i)?;
        self.classes
            .get(usize::from(c))
            .copied()
            .filter(|v| v.live(now_unix))
    }

    /// Whether the prefilter passes `ip` on to the exact tables (always
    /// true without a filter). Exposed to measure its false-positive rate.
    pub fn prefilter(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => self.maybe(u64::from(u32::from(a))),
            IpAddr::V6(a) => self.maybe(v6_filter_key(u128::from(a))),
        }
    }

    /// The name of a verdict's reason (`""` for none).
    pub fn reason(&self, index: u16) -> &str {
        match usize::from(index).checked_sub(1) {
            Some(i) => self.reasons.get(i).map_or("", String::as_str),
            None => "",
        }
    }

    /// The feed position this snapshot includes.
    pub fn watermark(&self) -> u64 {
        self.header.watermark
    }

    /// Sizes and counts.
    pub fn info(&self) -> Info {
        let h = &self.header;
        Info {
            source: self.source.display().to_string(),
            watermark: h.watermark,
            created_unix: h.created_unix,
            ipv4: h.n4,
            ipv4_prefixes: h.p4,
            ipv6: h.n6,
            ipv6_prefixes: h.p6,
            classes: h.classes,
            class_width: h.class_width,
            bytes: self.layout.end as u64,
            filter_bytes: if h.filter_len > 0 {
                h.filter_len + DESC_LEN as u64 + 8 * h.overlay_keys
            } else {
                0
            },
            overlay_keys: h.overlay_keys,
        }
    }

    /// The raw file bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.backing.bytes()[..self.layout.end]
    }

    /// Writes the snapshot durably and atomically: a temporary file in the
    /// same directory, fsync, rename over `path`, fsync of the directory.
    /// Snapshots already opened from the old file are unaffected.
    pub fn write_to(&self, path: &Path) -> Result<()> {
        write_atomically(path, self.as_bytes())
    }

    /// The filter sections (descriptors, fingerprints, overlay keys), when
    /// there is a filter: a delta reuses the main filter as it is.
    pub(crate) fn filter_sections(&self) -> Option<(&[u8], &[u8], &[u64])> {
        self.filter.as_ref()?;
        Some((
            self.sec(self.layout.filter_desc),
            self.sec(self.layout.filter),
            self.sec(self.layout.overlay_keys),
        ))
    }

    pub(crate) fn header(&self) -> &Header {
        &self.header
    }

    pub(crate) fn classes(&self) -> &[Verdict] {
        &self.classes
    }

    pub(crate) fn reasons(&self) -> &[String] {
        &self.reasons
    }

    /// Exact IPv4 entries in ascending order with their class indexes.
    pub(crate) fn v4_entries(&self) -> impl Iterator<Item = (u32, u16)> + '_ {
        let offsets = self.v4_offsets();
        let lows = self.sec::<u16>(self.layout.v4_low);
        (0..BUCKETS).flat_map(move |hi| {
            let (a, b) = (offsets[hi] as usize, offsets[hi + 1] as usize);
            (a..b).map(move |i| {
                (
                    ((hi as u32) << 16) | u32::from(lows[i]),
                    self.class_index(self.layout.v4_class, i),
                )
            })
        })
    }

    pub(crate) fn v6_entries(&self) -> impl Iterator<Item = (u128, u16)> + '_ {
        let keys = self.sec::<u128>(self.layout.v6_keys);
        keys.iter()
            .enumerate()
            .map(move |(i, &k)| (k, self.class_index(self.layout.v6_class, i)))
    }

    pub(crate) fn v4_prefixes(&self) -> impl Iterator<Item = (u32, u8, u16)> + '_ {
        self.sec::<Prefix4>(self.layout.v4_prefix)
            .iter()
            .map(|p| (p.addr, p.len, p.class))
    }

    pub(crate) fn v6_prefixes(&self) -> impl Iterator<Item = (u128, u8, u16)> + '_ {
        self.sec::<Prefix6>(self.layout.v6_prefix)
            .iter()
            .map(|p| (p.addr, p.len, p.class))
    }

    fn class_index(&self, classes: Sec, i: usize) -> u16 {
        match self.header.class_width {
            0 => 0,
            1 => self.sec::<u8>(classes).get(i).map_or(0, |&c| u16::from(c)),
            _ => self.sec::<u16>(classes).get(i).copied().unwrap_or(0),
        }
    }

    /// Every entry as (network, verdict), IPv4 first, exact before prefixes.
    pub fn entries(&self) -> impl Iterator<Item = (IpNet, Verdict)> + '_ {
        let class = |c: u16| self.classes.get(usize::from(c)).copied();
        let v4 = self.v4_entries().filter_map(move |(ip, c)| {
            Some((IpNet::V4(Ipv4Net::new(Ipv4Addr::from(ip), 32).ok()?), class(c)?))
        });
        let v4p = self.v4_prefixes().filter_map(move |(ip, len, c)| {
            Some((IpNet::V4(Ipv4Net::new(Ipv4Addr::from(ip), len).ok()?), class(c)?))
        });
        let v6 = self.v6_entries().filter_map(move |(ip, c)| {
            Some((IpNet::V6(Ipv6Net::new(Ipv6Addr::from(ip), 128).ok()?), class(c)?))
        });
        let v6p = self.v6_prefixes().filter_map(move |(ip, len, c)| {
            Some((IpNet::V6(Ipv6Net::new(Ipv6Addr::from(ip), len).ok()?), class(c)?))
        });
        v4.chain(v4p).chain(v6).chain(v6p)
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("info", &self.info()).finish()
    }
}

/// Position of `key` in sorted `lows`. Addresses within one /16 of a large
/// feed are close to uniform, so the interpolated guess lands within a
/// cache line of the answer; galloping out from it keeps skewed buckets
/// logarithmic. Saves the ~4 dependent cache misses of a binary search.
#[inline]
pub(crate) fn search_u16(lows: &[u16], key: u16) -> Option<usize> {
    let n = lows.len();
    if n == 0 {
        return None;
    }
    let guess = (usize::from(key) * n) >> 16;
    let (lo, hi) = if lows[guess] < key {
        let (mut lo, mut step) = (guess + 1, 1);
        loop {
            let probe = guess + step;
            if probe >= n {
                break (lo, n);
            }
            if lows[probe] >= key {
                break (lo, probe + 1);
            }
            lo = probe + 1;
            step *= 2;
        }
    } else {
        let (mut hi, mut step) = (guess + 1, 1);
        loop {
            if step > guess {
                break (0, hi);
            }
            let probe = guess - step;
            if lows[probe] < key {
                break (probe + 1, hi);
            }
            hi = probe + 1;
            step *= 2;
        }
    };
    lows[lo..hi].binary_search(&key).ok().map(|i| lo + i)
}

/// The filter key of an IPv6 address: a fixed fold to 64 bits (the filter
/// mixes it with its own seed). Stable across versions: it is in files.
pub(crate) fn v6_filter_key(ip: u128) -> u64 {
    let (hi, lo) = ((ip >> 64) as u64, ip as u64);
    hi.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ lo ^ (1 << 63)
}

/// Writes a file durably and atomically: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_meta(path, bytes).map(drop)
}

/// [`write_atomically`], returning the written file's metadata, taken
/// before the rename (which keeps inode, length and mtime): a caller can
/// tell its own file from one that replaced it right after.
pub(crate) fn write_atomically_meta(path: &Path, bytes: &[u8]) -> Result<std::fs::Metadata> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (tmp, mut f) = create_temp(&dir, &name)?;
    let result = (|| {
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        let meta = f.metadata().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))?;
        Ok(meta)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A new temp file next to `name` in `dir`: mode 0600, a name no other
/// user can guess, created with `O_EXCL` (`create_new`), so a file or
/// symlink planted in a shared directory is never opened, followed or
/// truncated.
fn create_temp(dir: &Path, name: &str) -> Result<(PathBuf, File)> {
    use std::hash::{BuildHasher as _, Hasher as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut last = None;
    for _ in 0..16 {
        // RandomState is keyed from the OS's random source per process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        h.write_u32(std::process::id());
        let tmp = dir.join(format!(".{name}.tmp.{:016x}", h.finish()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some((tmp, e)),
            Err(e) => return Err(io_err(&tmp)(e)),
        }
    }
    let (tmp, e) = last.unwrap_or_else(|| (dir.join(name), std::io::ErrorKind::AlreadyExists.into()));
    Err(io_err(&tmp)(e))
}

impl Snapshot {
    /// The snapshot after `delta`: `Ok(None)` when the delta is already
    /// included (its `to` is not past our watermark), an error when it does
    /// not start at our watermark. `self` is untouched either way.
    pub fn apply(
        &self,
        delta: &crate::Delta,
        source: &str,
        opts: crate::BuildOptions,
    ) -> Result<Option<Self>> {
        let current = self.watermark();
        if delta.to <= current {
            return Ok(None);
        }
        if delta.from != current {
            return Err(Error::OutOfOrder {
                source_name: source.to_owned(),
                from: delta.from,
                to: delta.to,
                current,
            });
        }
        crate::builder::merge(self, delta, opts).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::search_u16;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn interpolation_search_agrees_with_binary_search(
            mut v in proptest::collection::vec(any::<u16>(), 0..300),
            skew in 0u32..3,
            probes in proptest::collection::vec(any::<u16>(), 40),
        ) {
            // Skewed buckets (all keys in a corner) exercise the galloping.
            for x in &mut v { *x >>= skew * 6; }
            v.sort_unstable();
            v.dedup();
            for key in probes.into_iter().chain(v.iter().copied()) {
                prop_assert_eq!(search_u16(&v, key), v.binary_search(&key).ok());
            }
        }
    }
}
