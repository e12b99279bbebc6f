//! Durable learned state: a write-ahead log of fixed-size, checksummed
//! records plus a periodic snapshot of the whole state.
//!
//! `append` returns only after `fdatasync`, so anything acknowledged
//! survives `kill -9` or power loss. On open, the snapshot is loaded and the
//! log replayed up to the first damaged or partial record; the damaged tail
//! (a write torn by the crash) is cut off, never fatal.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use bytemuck::{Pod, Zeroable};
use ipnet::IpNet;

use crate::snapshot::write_atomically;
use crate::{Action, Result, io_err};

const SNAP_MAGIC: [u8; 8] = *b"PLSDSTAT";
const SNAP_FILE: &str = "state.snap";
const WAL_FILE: &str = "state.wal";

/// One change to the learned state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntry {
    /// The client (an address, or an IPv6 /64).
    pub net: IpNet,
    /// The score set, or `None` when the entry was cleared.
    pub score: Option<u8>,
    /// Deny/allow marks.
    pub action: Action,
    /// Unix seconds after which the entry no longer matters (the score has
    /// recovered, the ban lapsed); 0 = never.
    pub expires: u64,
    /// When it was recorded (Unix milliseconds).
    pub at_ms: u64,
}

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Record {
    crc: u32,
    kind: u8,
    family: u8,
    prefix_len: u8,
    score: u8,
    action: u8,
    pad: [u8; 7],
    addr: [u8; 16],
    expires: u64,
    at_ms: u64,
}

const RECORD: usize = size_of::<Record>();

impl Record {
    fn of(e: &LogEntry) -> Self {
        let (family, addr) = match e.net.addr() {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (4, b)
            }
            IpAddr::V6(a) => (6, a.octets()),
        };
        let mut r = Self {
            crc: 0,
            kind: if e.score.is_some() { 1 } else { 2 },
            family,
            prefix_len: e.net.prefix_len(),
            score: e.score.unwrap_or(0),
            action: e.action as u8,
            pad: [0; 7],
            addr,
            expires: e.expires,
            at_ms: e.at_ms,
        };
        r.crc = crc32fast::hash(&bytemuck::bytes_of(&r)[4..]);
        r
    }

    fn entry(&self) -> Option<LogEntry> {
        if crc32fast::hash(&bytemuck::bytes_of(self)[4..]) != self.crc {
            return None;
        }
        let ip = match self.family {
            4 => IpAddr::V4(Ipv4Addr::new(
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            )),
            6 => IpAddr::V6(Ipv6Addr::from(self.addr)),
            _ => return None,
        };
        Some(LogEntry {
            net: IpNet::new(ip, self.prefix_len).ok()?,
            score: match self.kind {
                1 => Some(self.score.min(100)),
                2 => None,
                _ => return None,
            },
            action: Action::from_u8(self.action)?,
            expires: self.expires,
            at_ms: self.at_ms,
        })
    }
}

/// What [`StateLog::open`] found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The live state: one entry per client, cleared and expired ones gone.
    pub entries: Vec<LogEntry>,
    /// Log records replayed on top of the snapshot.
    pub replayed: u64,
    /// Bytes of damaged or torn log tail that were cut off.
    pub dropped_bytes: u64,
    /// Problems worth an operator's attention (nothing here is fatal).
    pub warnings: Vec<String>,
}

/// The log. One writer (the daemon's state task); not shared.
pub struct StateLog {
    dir: PathBuf,
    wal: File,
    state: HashMap<IpNet, LogEntry>,
    wal_records: u64,
    max_entries: usize,
}

fn read_records(bytes: &[u8]) -> (Vec<LogEntry>, usize) {
    let mut out = Vec::with_capacity(bytes.len() / RECORD);
    for (i, chunk) in bytes.chunks_exact(RECORD).enumerate() {
        match bytemuck::pod_read_unaligned::<Record>(chunk).entry() {
            Some(e) => out.push(e),
            None => return (out, i * RECORD),
        }
    }
    let good = out.len() * RECORD;
    (out, good)
}

impl StateLog {
    /// Opens (creating) the state in `dir`, keeping at most `max_entries`
    /// clients (the soonest-expiring go first).
    pub fn open(dir: &Path, max_entries: usize, now_unix: u64) -> Result<(Self, Recovery)> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut rec = Recovery::default();
        let mut state = HashMap::new();
        let snap_path = dir.join(SNAP_FILE);
        match std::fs::read(&snap_path) {
            Ok(bytes) => match Self::parse_snapshot(&bytes) {
                Some(entries) => {
                    for e in entries {
                        state.insert(e.net, e);
                    }
                }
                None => rec.warnings.push(format!(
                    "{}: damaged state snapshot ignored; replaying the log alone",
                    snap_path.display()
                )),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&snap_path)(e)),
        }
        let wal_path = dir.join(WAL_FILE);
        // Learned state says who was penalized and why: the owner's only.
        let mut wal = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(&wal_path)
            .map_err(io_err(&wal_path))?;
        let mut bytes = Vec::new();
        wal.read_to_end(&mut bytes).map_err(io_err(&wal_path))?;
        let (entries, good) = read_records(&bytes);
        if good < bytes.len() {
            rec.dropped_bytes = (bytes.len() - good) as u64;
            rec.warnings.push(format!(
                "{}: cut {} bytes of damaged or torn records after {} good ones",
                wal_path.display(),
                rec.dropped_bytes,
                entries.len()
            ));
            wal.set_len(good as u64).map_err(io_err(&wal_path))?;
            wal.sync_all().map_err(io_err(&wal_path))?;
        }
        rec.replayed = entries.len() as u64;
        for e in entries {
            state.insert(e.net, e);
        }
        let mut log = Self {
            dir: dir.to_owned(),
            wal,
            state,
            wal_records: rec.replayed,
            max_entries,
        };
        log.prune(now_unix);
        rec.entries = log.state.values().copied().collect();
        Ok((log, rec))
    }

    fn parse_snapshot(bytes: &[u8]) -> Option<Vec<LogEntry>> {
        let magic = bytes.get(..8)?;
        let count = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        let crc = u32::from_le_bytes(bytes.get(16..20)?.try_into().ok()?);
        let body = bytes.get(24..)?;
        if magic != SNAP_MAGIC
            || body.len() as u64 != count.checked_mul(RECORD as u64)?
            || crc32fast::hash(body) != crc
        {
            return None;
        }
        let (entries, good) = read_records(body);
        (good == body.len()).then_some(entries)
    }

    /// Drops cleared and expired entries, then the soonest-expiring beyond
    /// the cap.
    fn prune(&mut self, now_unix: u64) {
        self.state
            .retain(|_, e| e.score.is_some() && (e.expires == 0 || e.expires > now_unix));
        if self.state.len() > self.max_entries {
            let mut by_expiry: Vec<(u64, IpNet)> = self
                .state
                .values()
                .map(|e| (if e.expires == 0 { u64::MAX } else { e.expires }, e.net))
                .collect();
            by_expiry.sort_unstable();
            let excess = self.state.len() - self.max_entries;
            for (_, net) in &by_expiry[..excess] {
                self.state.remove(net);
            }
        }
    }

    /// Appends entries and waits for them to reach the disk. Once this
    /// returns `Ok`, the entries survive a crash.
    pub fn append(&mut self, entries: &[LogEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(entries.len() * RECORD);
        for e in entries {
            buf.extend_from_slice(bytemuck::bytes_of(&Record::of(e)));
        }
        let path = self.dir.join(WAL_FILE);
        self.wal.write_all(&buf).map_err(io_err(&path))?;
        self.wal.sync_data().map_err(io_err(&path))?;
        for e in entries {
            self.state.insert(e.net, *e);
        }
        self.wal_records += entries.len() as u64;
        Ok(())
    }

    /// Whether the log has grown enough that [`Self::compact`] is worth it.
    pub fn wants_compaction(&self) -> bool {
        self.wal_records > 10_000 && self.wal_records > 2 * self.state.len() as u64
    }

    /// Writes the whole state as a snapshot (atomically) and empties the
    /// log. A crash at any point leaves either the old or the new snapshot,
    /// and replaying the log on top of either gives the same state.
    pub fn compact(&mut self, now_unix: u64) -> Result<()> {
        self.prune(now_unix);
        let mut body = Vec::with_capacity(self.state.len() * RECORD);
        for e in self.state.values() {
            body.extend_from_slice(bytemuck::bytes_of(&Record::of(e)));
        }
        let mut file = Vec::with_capacity(24 + body.len());
        file.extend_from_slice(&SNAP_MAGIC);
        file.extend_from_slice(&(self.state.len() as u64).to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        file.extend_from_slice(&[0; 4]);
        file.extend_from_slice(&body);
        write_atomically(&self.dir.join(SNAP_FILE), &file)?;
        let path = self.dir.join(WAL_FILE);
        self.wal.set_len(0).map_err(io_err(&path))?;
        self.wal.sync_all().map_err(io_err(&path))?;
        self.wal_records = 0;
        Ok(())
    }

    /// Clients with live state.
    pub fn len(&self) -> usize {
        self.state.len()
    }

    /// Whether no client has live state.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// Records in the log since the last compaction.
    pub fn wal_records(&self) -> u64 {
        self.wal_records
    }

    /// The current entry for a client.
    pub fn get(&self, net: &IpNet) -> Option<&LogEntry> {
        self.state.get(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ip: &str, score: Option<u8>) -> LogEntry {
        LogEntry {
            net: IpNet::from(ip.parse::<IpAddr>().unwrap()),
            score,
            action: Action::Score,
            expires: 0,
            at_ms: 1,
        }
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("palisade-wal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn appended_entries_come_back_and_a_torn_tail_is_cut() {
        let dir = tempdir("torn");
        let (mut log, rec) = StateLog::open(&dir, 100, 0).unwrap();
        assert!(rec.entries.is_empty());
        log.append(&[entry("192.0.2.1", Some(10)), entry("2001:db8::1", Some(20))])
            .unwrap();
        log.append(&[entry("192.0.2.1", Some(5))]).unwrap();
        drop(log);
        // A crash mid-write: half a record.
        let wal = dir.join(WAL_FILE);
        let mut f = OpenOptions::new().append(true).open(&wal).unwrap();
        f.write_all(&[0xAB; RECORD / 2]).unwrap();
        drop(f);
        let (log, rec) = StateLog::open(&dir, 100, 0).unwrap();
        assert_eq!(rec.dropped_bytes, (RECORD / 2) as u64);
        assert_eq!(rec.replayed, 3);
        assert_eq!(log.get(&entry("192.0.2.1", None).net).unwrap().score, Some(5));
        assert_eq!(rec.entries.len(), 2);
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 3 * RECORD as u64);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_flipped_bit_ends_the_replay_there() {
        let dir = tempdir("flip");
        let (mut log, _) = StateLog::open(&dir, 100, 0).unwrap();
        log.append(&[
            entry("192.0.2.1", Some(10)),
            entry("192.0.2.2", Some(20)),
            entry("192.0.2.3", Some(30)),
        ])
        .unwrap();
        drop(log);
        let wal = dir.join(WAL_FILE);
        let mut bytes = std::fs::read(&wal).unwrap();
        bytes[RECORD + 10] ^= 1;
        std::fs::write(&wal, &bytes).unwrap();
        let (_, rec) = StateLog::open(&dir, 100, 0).unwrap();
        assert_eq!(rec.replayed, 1);
        assert_eq!(rec.dropped_bytes, 2 * RECORD as u64);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn compaction_keeps_the_state_and_drops_cleared_and_expired() {
        let dir = tempdir("compact");
        let (mut log, _) = StateLog::open(&dir, 100, 0).unwrap();
        let mut lapsing = entry("192.0.2.9", Some(1));
        lapsing.expires = 50;
        log.append(&[
            entry("192.0.2.1", Some(10)),
            entry("192.0.2.2", Some(20)),
            lapsing,
        ])
        .unwrap();
        log.append(&[entry("192.0.2.2", None)]).unwrap();
        log.compact(100).unwrap();
        assert_eq!(log.wal_records(), 0);
        log.append(&[entry("192.0.2.3", Some(30))]).unwrap();
        drop(log);
        let (_, rec) = StateLog::open(&dir, 100, 100).unwrap();
        let mut got: Vec<_> = rec.entries.iter().map(|e| (e.net.to_string(), e.score)).collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("192.0.2.1/32".into(), Some(10)),
                ("192.0.2.3/32".into(), Some(30))
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_cap_evicts_the_soonest_expiring() {
        let dir = tempdir("cap");
        let (mut log, _) = StateLog::open(&dir, 2, 0).unwrap();
        let mut a = entry("192.0.2.1", Some(1));
        a.expires = 1000;
        let mut b = entry("192.0.2.2", Some(1));
        b.expires = 2000;
        log.append(&[a, b, entry("192.0.2.3", Some(1))]).unwrap();
        log.compact(0).unwrap();
        assert_eq!(log.len(), 2);
        assert!(log.get(&a.net).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
