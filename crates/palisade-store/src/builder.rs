//! Building snapshots: from records (CSV), or by merging a delta into an
//! existing snapshot.

use std::collections::HashMap;

use foldhash::fast::FixedState;

use ipnet::IpNet;

use crate::filter::{self, Parts, shard_of};
use crate::flatten::{Range, flatten};
use crate::snapshot::{
    BUCKETS, COVER_WORDS, ClassRec, HEADER_LEN, Header, Layout, MAGIC, Prefix4, Prefix6, Snapshot, VERSION,
    v6_filter_key,
};
use crate::{Action, Error, Result, Verdict};

/// Knobs for building a snapshot.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// Build the binary fuse prefilter (default on; off only to measure it).
    pub filter: bool,
    /// Stamped in the header.
    pub created_unix: u64,
    /// When applying a delta, rebuild the whole filter instead of growing
    /// the overlay (which happens by itself past 1/8 of the store).
    pub compact: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            filter: true,
            created_unix: 0,
            compact: false,
        }
    }
}

/// Collects entries, then encodes them. Later entries for the same network
/// replace earlier ones.
#[derive(Debug, Default)]
pub struct Builder {
    classes: Vec<Verdict>,
    class_ix: HashMap<Verdict, u16, FixedState>,
    reasons: Vec<String>,
    reason_ix: HashMap<String, u16, FixedState>,
    v4: Vec<(u32, u16)>,
    v4p: Vec<(u32, u8, u16)>,
    v6: Vec<(u128, u16)>,
    v6p: Vec<(u128, u8, u16)>,
    watermark: u64,
}

/// Sorted, de-duplicated tables ready to encode.
pub(crate) struct Tables {
    pub classes: Vec<Verdict>,
    pub reasons: Vec<String>,
    pub v4: Vec<(u32, u16)>,
    pub v4p: Vec<(u32, u8, u16)>,
    pub v6: Vec<(u128, u16)>,
    pub v6p: Vec<(u128, u8, u16)>,
    pub watermark: u64,
}

/// Stable sort by key, keeping the last of equal keys.
fn sort_last_wins<K: Ord + Copy, T: Copy>(v: &mut Vec<T>, key: impl Fn(&T) -> K) {
    v.sort_by_key(&key);
    let mut out = 0;
    for i in 0..v.len() {
        if i + 1 < v.len() && key(&v[i]) == key(&v[i + 1]) {
            continue;
        }
        v[out] = v[i];
        out += 1;
    }
    v.truncate(out);
}

impl Builder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from the reason and verdict tables of `base`, so its class
    /// indexes stay valid (used by delta merges).
    pub(crate) fn with_tables_of(base: &Snapshot) -> Self {
        let mut b = Self::new();
        for r in base.reasons() {
            b.reason_ix.insert(r.clone(), (b.reasons.len() + 1) as u16);
            b.reasons.push(r.clone());
        }
        for &c in base.classes() {
            b.class_ix.insert(c, b.classes.len() as u16);
            b.classes.push(c);
        }
        b
    }

    /// Sets the feed position the snapshot will include.
    pub fn watermark(&mut self, watermark: u64) -> &mut Self {
        self.watermark = watermark;
        self
    }

    /// Interns a verdict, returning its class index.
    pub(crate) fn class(&mut self, score: u8, action: Action, reason: &str, expires: u64) -> Result<u16> {
        let reason = if reason.is_empty() {
            0
        } else if let Some(&r) = self.reason_ix.get(reason) {
            r
        } else {
            if self.reasons.len() >= usize::from(u16::MAX) - 1 {
                return Err(Error::TooMany {
                    what: "reasons",
                    max: usize::from(u16::MAX) - 1,
                });
            }
            let r = (self.reasons.len() + 1) as u16;
            self.reasons.push(reason.to_owned());
            self.reason_ix.insert(reason.to_owned(), r);
            r
        };
        let v = Verdict {
            score: score.min(100),
            action,
            reason,
            expires,
        };
        if let Some(&c) = self.class_ix.get(&v) {
            return Ok(c);
        }
        if self.classes.len() >= usize::from(u16::MAX) {
            return Err(Error::TooMany {
                what: "verdicts",
                max: usize::from(u16::MAX),
            });
        }
        let c = self.classes.len() as u16;
        self.classes.push(v);
        self.class_ix.insert(v, c);
        Ok(c)
    }

    /// Adds (or, when repeated, replaces) an entry.
    pub fn insert(
        &mut self,
        net: IpNet,
        score: u8,
        action: Action,
        reason: &str,
        expires: u64,
    ) -> Result<()> {
        let c = self.class(score, action, reason, expires)?;
        self.insert_class(net, c);
        Ok(())
    }

    pub(crate) fn insert_class(&mut self, net: IpNet, c: u16) {
        match net {
            IpNet::V4(n) if n.prefix_len() == 32 => self.v4.push((u32::from(n.addr()), c)),
            IpNet::V4(n) => self.v4p.push((u32::from(n.network()), n.prefix_len(), c)),
            IpNet::V6(n) if n.prefix_len() == 128 => self.v6.push((u128::from(n.addr()), c)),
            IpNet::V6(n) => self.v6p.push((u128::from(n.network()), n.prefix_len(), c)),
        }
    }

    /// Entries added so far (before de-duplication).
    pub fn len(&self) -> usize {
        self.v4.len() + self.v4p.len() + self.v6.len() + self.v6p.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn into_tables(mut self) -> Tables {
        sort_last_wins(&mut self.v4, |e| e.0);
        sort_last_wins(&mut self.v4p, |e| (e.0, e.1));
        sort_last_wins(&mut self.v6, |e| e.0);
        sort_last_wins(&mut self.v6p, |e| (e.0, e.1));
        Tables {
            classes: self.classes,
            reasons: self.reasons,
            v4: self.v4,
            v4p: self.v4p,
            v6: self.v6,
            v6p: self.v6p,
            watermark: self.watermark,
        }
    }

    /// Encodes a snapshot in memory.
    pub fn finish(self, opts: BuildOptions) -> Result<Snapshot> {
        encode(self.into_tables(), opts, FilterPlan::Build)
    }
}

fn ranges<T: Copy>(prefixes: &[(T, u8, u16)], bits: u32, to_u128: impl Fn(T) -> u128) -> Vec<Range> {
    // Sorted by (network, len): wider first at equal starts, as flatten wants.
    prefixes
        .iter()
        .map(|&(addr, len, class)| {
            let start = to_u128(addr);
            let host_bits = bits - u32::from(len);
            let size_minus_one = if host_bits >= 128 {
                u128::MAX
            } else {
                (1u128 << host_bits) - 1
            };
            Range {
                start,
                end: start | size_minus_one,
                class,
            }
        })
        .collect()
}

/// Drops verdicts nothing refers to, renumbering the rest.
fn compact_classes(t: &mut Tables) {
    let mut used = vec![false; t.classes.len()];
    let mut mark = |c: u16| {
        if let Some(u) = used.get_mut(usize::from(c)) {
            *u = true;
        }
    };
    t.v4.iter().for_each(|e| mark(e.1));
    t.v6.iter().for_each(|e| mark(e.1));
    t.v4p.iter().for_each(|e| mark(e.2));
    t.v6p.iter().for_each(|e| mark(e.2));
    if used.iter().all(|&u| u) {
        return;
    }
    let mut remap = vec![0u16; t.classes.len()];
    let mut kept = Vec::new();
    for (i, c) in t.classes.iter().enumerate() {
        if used[i] {
            remap[i] = kept.len() as u16;
            kept.push(*c);
        }
    }
    t.classes = kept;
    let r = |c: u16| remap[usize::from(c)];
    t.v4.iter_mut().for_each(|e| e.1 = r(e.1));
    t.v6.iter_mut().for_each(|e| e.1 = r(e.1));
    t.v4p.iter_mut().for_each(|e| e.2 = r(e.2));
    t.v6p.iter_mut().for_each(|e| e.2 = r(e.2));
}

/// Appends `bytes` at `at` (which must be the section's 16-aligned offset).
fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

pub(crate) fn encode(mut t: Tables, opts: BuildOptions, plan: FilterPlan<'_>) -> Result<Snapshot> {
    compact_classes(&mut t);
    // Exact entries all sharing class 0 need no per-entry index.
    let max_exact_class = t.v4.iter().map(|e| e.1).chain(t.v6.iter().map(|e| e.1)).max();
    let class_width: u32 = match max_exact_class {
        None | Some(0) => 0,
        Some(c) if c <= 0xff => 1,
        Some(_) => 2,
    };
    let r4 = flatten(&ranges(&t.v4p, 32, u128::from));
    let r6 = flatten(&ranges(&t.v6p, 128, |a| a));

    if !opts.filter || (t.v4.is_empty() && t.v6.is_empty()) {
        let tables = EncodedTables::of(&t, &r4);
        return write(t, r4, r6, class_width, tables, None, opts);
    }
    if let FilterPlan::Reuse { base, added } = plan
        && !opts.compact
        && let Some(parts) = reuse(base, added)
    {
        let tables = EncodedTables::of(&t, &r4);
        return write(t, r4, r6, class_width, tables, Some(parts), opts);
    }
    let mut shards: [Vec<u64>; 2] = Default::default();
    // IPv4 keys are sorted and distinct already; only the hashed IPv6 keys
    // need sorting, and duplicates can only come from them.
    for e in &t.v4 {
        let k = u64::from(e.0);
        shards[shard_of(k)].push(k);
    }
    if !t.v6.is_empty() {
        for e in &t.v6 {
            let k = v6_filter_key(e.0);
            shards[shard_of(k)].push(k);
        }
        for s in &mut shards {
            s.sort_unstable();
            s.dedup();
        }
    }
    // The filter builds on other threads while this one encodes the tables:
    // construction is most of a full rebuild's time.
    std::thread::scope(|scope| {
        let main = scope.spawn(move || filter::build_main(shards));
        let tables = EncodedTables::of(&t, &r4);
        // Construction fails only in pathological cases; the store is then
        // exact without the shortcut.
        let parts = main.join().ok().flatten().map(|[a, b]| Parts {
            main: [(a.0, a.1.into()), (b.0, b.1.into())],
            overlay: None,
            overlay_keys: Vec::new(),
        });
        write(t, r4, r6, class_width, tables, parts, opts)
    })
}

/// How a snapshot's filter comes about.
pub(crate) enum FilterPlan<'a> {
    /// From all exact keys.
    Build,
    /// Keep `base`'s main filter; `added` (filter keys of exact entries a
    /// delta inserted) join the overlay.
    Reuse { base: &'a Snapshot, added: Vec<u64> },
}

/// The overlay grows at most to an eighth of the store (4096 at least)
/// before a delta rebuilds the whole filter.
fn overlay_limit(exact_keys: u64) -> usize {
    usize::try_from(exact_keys / 8).unwrap_or(usize::MAX).max(4096)
}

fn reuse(base: &Snapshot, mut added: Vec<u64>) -> Option<Parts<'_>> {
    let (desc, fingerprints, old) = base.filter_sections()?;
    let h = base.header();
    if old.len() + added.len() > overlay_limit(h.n4 + h.n6) {
        return None;
    }
    added.extend_from_slice(old);
    added.sort_unstable();
    added.dedup();
    let overlay = if added.is_empty() {
        None
    } else {
        Some(xorf::BinaryFuse8::try_from(&added).ok()?)
    };
    let half = |i| {
        let (d, range) = filter::main_half(desc, fingerprints, i);
        (d, std::borrow::Cow::Borrowed(&fingerprints[range]))
    };
    Some(Parts {
        main: [half(0), half(1)],
        overlay,
        overlay_keys: added,
    })
}

/// Section contents computed before the filter is ready.
struct EncodedTables {
    offsets: Vec<u32>,
    lows: Vec<u16>,
    cover: Vec<u64>,
}

impl EncodedTables {
    fn of(t: &Tables, r4: &[Range]) -> Self {
        let mut offsets = vec![0u32; BUCKETS + 1];
        for &(ip, _) in &t.v4 {
            offsets[(ip >> 16) as usize + 1] += 1;
        }
        for i in 0..BUCKETS {
            offsets[i + 1] += offsets[i];
        }
        let lows = t.v4.iter().map(|e| e.0 as u16).collect();
        let mut cover = vec![0u64; COVER_WORDS];
        for r in r4 {
            for hi in (r.start >> 16)..=(r.end >> 16) {
                cover[(hi / 64) as usize] |= 1 << (hi % 64);
            }
        }
        Self { offsets, lows, cover }
    }
}

fn write(
    t: Tables,
    r4: Vec<Range>,
    r6: Vec<Range>,
    class_width: u32,
    tables: EncodedTables,
    filter: Option<Parts<'_>>,
    opts: BuildOptions,
) -> Result<Snapshot> {
    let reasons = t.reasons.join("\n");
    let mut header = Header {
        magic: MAGIC,
        version: VERSION,
        class_width,
        watermark: t.watermark,
        created_unix: opts.created_unix,
        body_len: 0,
        n4: t.v4.len() as u64,
        p4: t.v4p.len() as u64,
        m4: r4.len() as u64,
        n6: t.v6.len() as u64,
        p6: t.v6p.len() as u64,
        m6: r6.len() as u64,
        classes: t.classes.len() as u64,
        reasons_len: reasons.len() as u64,
        filter_len: filter.as_ref().map_or(0, |f| f.len() as u64),
        overlay_keys: filter.as_ref().map_or(0, |f| f.overlay_keys.len() as u64),
        body_crc: 0,
        header_crc: 0,
    };
    let layout = Layout::of(&header).ok_or(Error::TooMany {
        what: "entries",
        max: usize::MAX,
    })?;
    header.body_len = (layout.end - HEADER_LEN) as u64;
    let mut heap = vec![0u128; layout.end / 16];
    let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut heap);

    put(buf, layout.v4_offsets.off, bytemuck::cast_slice(&tables.offsets));
    put(buf, layout.v4_low.off, bytemuck::cast_slice(&tables.lows));
    put_classes(buf, layout.v4_class.off, class_width, t.v4.iter().map(|e| e.1));
    let p4: Vec<Prefix4> = t
        .v4p
        .iter()
        .map(|&(addr, len, class)| Prefix4 {
            addr,
            len,
            pad: 0,
            class,
        })
        .collect();
    put(buf, layout.v4_prefix.off, bytemuck::cast_slice(&p4));
    let starts: Vec<u32> = r4.iter().map(|r| r.start as u32).collect();
    let ends: Vec<u32> = r4.iter().map(|r| r.end as u32).collect();
    let iv_classes: Vec<u16> = r4.iter().map(|r| r.class).collect();
    put(buf, layout.v4_iv_start.off, bytemuck::cast_slice(&starts));
    put(buf, layout.v4_iv_end.off, bytemuck::cast_slice(&ends));
    put(buf, layout.v4_iv_class.off, bytemuck::cast_slice(&iv_classes));
    put(buf, layout.v4_cover.off, bytemuck::cast_slice(&tables.cover));

    let keys6: Vec<u128> = t.v6.iter().map(|e| e.0).collect();
    put(buf, layout.v6_keys.off, bytemuck::cast_slice(&keys6));
    put_classes(buf, layout.v6_class.off, class_width, t.v6.iter().map(|e| e.1));
    let p6: Vec<Prefix6> = t
        .v6p
        .iter()
        .map(|&(addr, len, class)| Prefix6 {
            addr,
            len,
            pad: [0],
            class,
            pad2: [0; 12],
        })
        .collect();
    put(buf, layout.v6_prefix.off, bytemuck::cast_slice(&p6));
    let starts: Vec<u128> = r6.iter().map(|r| r.start).collect();
    let ends: Vec<u128> = r6.iter().map(|r| r.end).collect();
    let iv_classes: Vec<u16> = r6.iter().map(|r| r.class).collect();
    put(buf, layout.v6_iv_start.off, bytemuck::cast_slice(&starts));
    put(buf, layout.v6_iv_end.off, bytemuck::cast_slice(&ends));
    put(buf, layout.v6_iv_class.off, bytemuck::cast_slice(&iv_classes));

    let recs: Vec<ClassRec> = t
        .classes
        .iter()
        .map(|c| ClassRec {
            score: c.score,
            action: c.action as u8,
            reason: c.reason,
            pad: 0,
            expires: c.expires,
        })
        .collect();
    put(buf, layout.classes.off, bytemuck::cast_slice(&recs));
    put(buf, layout.reasons.off, reasons.as_bytes());
    if let Some(parts) = &filter {
        put(buf, layout.filter_desc.off, &parts.descriptors());
        let mut at = layout.filter.off;
        for f in parts.fingerprints() {
            put(buf, at, f);
            at += f.len();
        }
        put(
            buf,
            layout.overlay_keys.off,
            bytemuck::cast_slice(&parts.overlay_keys),
        );
    }
    header.body_crc = crc32fast::hash(&buf[HEADER_LEN..layout.end]);
    header.header_crc = crc32fast::hash(&bytemuck::bytes_of(&header)[..HEADER_LEN - 4]);
    put(buf, 0, bytemuck::bytes_of(&header));
    Snapshot::from_heap(heap)
}

fn put_classes(buf: &mut [u8], at: usize, width: u32, classes: impl Iterator<Item = u16>) {
    match width {
        0 => {}
        1 => classes.enumerate().for_each(|(i, c)| buf[at + i] = c as u8),
        _ => classes.enumerate().for_each(|(i, c)| {
            buf[at + 2 * i..at + 2 * i + 2].copy_from_slice(&c.to_le_bytes());
        }),
    }
}

/// Merges sorted `base` entries with sorted operations (`None` deletes).
fn merge_sorted<K: Ord + Copy>(
    base: impl Iterator<Item = (K, u16)>,
    ops: &[(K, Option<u16>)],
    capacity: usize,
) -> Vec<(K, u16)> {
    let mut out = Vec::with_capacity(capacity + ops.len());
    let mut ops = ops.iter().peekable();
    for (k, c) in base {
        while let Some(&&(ok, oc)) = ops.peek()
            && ok < k
        {
            out.extend(oc.map(|c| (ok, c)));
            ops.next();
        }
        match ops.peek() {
            Some(&&(ok, oc)) if ok == k => {
                out.extend(oc.map(|c| (ok, c)));
                ops.next();
            }
            _ => out.push((k, c)),
        }
    }
    out.extend(ops.filter_map(|&(k, c)| c.map(|c| (k, c))));
    out
}

/// Applies a delta on top of `base`, producing the next snapshot. Every
/// table is a linear merge; nothing is re-sorted except the operations.
pub(crate) fn merge(base: &Snapshot, delta: &crate::Delta, opts: BuildOptions) -> Result<Snapshot> {
    let mut b = Builder::with_tables_of(base);
    let mut v4: Vec<(u32, Option<u16>)> = Vec::new();
    let mut v4p: Vec<((u32, u8), Option<u16>)> = Vec::new();
    let mut v6: Vec<(u128, Option<u16>)> = Vec::new();
    let mut v6p: Vec<((u128, u8), Option<u16>)> = Vec::new();
    for op in &delta.ops {
        let (net, class) = match op {
            crate::Op::Upsert {
                net,
                score,
                action,
                reason,
                expires,
            } => (*net, Some(b.class(*score, *action, reason, *expires)?)),
            crate::Op::Delete(net) => (*net, None),
        };
        match net {
            IpNet::V4(n) if n.prefix_len() == 32 => v4.push((u32::from(n.addr()), class)),
            IpNet::V4(n) => v4p.push(((u32::from(n.network()), n.prefix_len()), class)),
            IpNet::V6(n) if n.prefix_len() == 128 => v6.push((u128::from(n.addr()), class)),
            IpNet::V6(n) => v6p.push(((u128::from(n.network()), n.prefix_len()), class)),
        }
    }
    sort_last_wins(&mut v4, |e| e.0);
    sort_last_wins(&mut v4p, |e| e.0);
    sort_last_wins(&mut v6, |e| e.0);
    sort_last_wins(&mut v6p, |e| e.0);
    let h = base.header();
    let new_v4 = merge_sorted(base.v4_entries(), &v4, h.n4 as usize);
    let new_v6 = merge_sorted(base.v6_entries(), &v6, h.n6 as usize);
    let new_v4p = merge_sorted(
        base.v4_prefixes().map(|(a, l, c)| ((a, l), c)),
        &v4p,
        h.p4 as usize,
    );
    let new_v6p = merge_sorted(
        base.v6_prefixes().map(|(a, l, c)| ((a, l), c)),
        &v6p,
        h.p6 as usize,
    );
    let added: Vec<u64> = v4
        .iter()
        .filter(|e| e.1.is_some())
        .map(|e| u64::from(e.0))
        .chain(v6.iter().filter(|e| e.1.is_some()).map(|e| v6_filter_key(e.0)))
        .collect();
    let tables = Tables {
        classes: b.classes,
        reasons: b.reasons,
        v4: new_v4,
        v4p: new_v4p.into_iter().map(|((a, l), c)| (a, l, c)).collect(),
        v6: new_v6,
        v6p: new_v6p.into_iter().map(|((a, l), c)| (a, l, c)).collect(),
        watermark: delta.to,
    };
    encode(tables, opts, FilterPlan::Reuse { base, added })
}
