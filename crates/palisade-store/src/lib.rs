//! Palisade's reputation store: verdicts for tens of millions
//! of IPv4/IPv6 addresses and CIDR prefixes, answered exactly, from a
//! compact snapshot read into private memory, so that nothing done to the file
//! on disk afterwards can change or break it.
//!
//! # Layout, and why
//! * Exact IPv4 addresses are split at /16: a 65 537-entry offset table and,
//!   per /16, the sorted low 16 bits of its addresses. A lookup is one offset
//!   load and a binary search over a few hundred bytes; the set costs 2 bytes
//!   per address (10 M addresses = 19.3 MiB), plus the verdict index (0, 1 or
//!   2 bytes: 0 when every entry has the same verdict, as in a plain
//!   blocklist).
//! * Verdicts (score, action, reason, expiry) are interned into a class table,
//!   so feeds with few distinct verdicts pay one byte per entry.
//! * IPv6 addresses are a sorted `u128` array. Prefixes of both families are
//!   flattened into disjoint intervals where the most specific prefix wins,
//!   so a prefix lookup is one binary search.
//! * A binary fuse filter (≈9 bits per exact key, ≈0.4 % false positives) is
//!   consulted first: on clean traffic most lookups end after three
//!   independent byte loads. The filter only ever short-cuts a "not present"
//!   answer; every "present" goes through the exact table, so it cannot make
//!   a verdict wrong. A Bloom filter at the same false-positive rate needs
//!   ≈11.5 bits per key and k=8 dependent probes; the fuse filter is smaller
//!   and needs exactly three.
//!
//! Snapshots are immutable. Deltas ([`Delta`]) are merged into a new
//! snapshot (a linear merge of sorted arrays), which [`StoreCell`] swaps in
//! with one atomic pointer store: readers never lock and never see a
//! half-applied delta.
//!
//! [`StateLog`] is the write-ahead log + snapshot that keeps Palisade's own
//! learned state (scores, bans) across `kill -9`.

mod builder;
mod cell;
mod csv;
mod delta;
mod filter;
mod flatten;
pub mod sign;
mod snapshot;
mod wal;

use std::path::PathBuf;

pub use builder::{BuildOptions, Builder};
pub use cell::{FeedStatus, StoreCell};
pub use csv::parse_record;
pub use delta::{Delta, Op};
pub use snapshot::{Info, Snapshot, write_atomically};
pub use wal::{LogEntry, Recovery, StateLog};

/// What an entry tells the proxy to do with a matching client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Action {
    /// Apply the score like any other reputation (blocked below the
    /// threshold).
    #[default]
    Score = 0,
    /// Always refuse (403).
    Deny = 1,
    /// Never limit or block.
    Allow = 2,
}

impl Action {
    /// The name used in CSV files and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Score => "score",
            Self::Deny => "deny",
            Self::Allow => "allow",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Score,
            1 => Self::Deny,
            2 => Self::Allow,
            _ => return None,
        })
    }
}

impl std::str::FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "score" => Ok(Self::Score),
            "deny" => Ok(Self::Deny),
            "allow" => Ok(Self::Allow),
            other => Err(format!(
                "unknown action {other:?} (expected score, deny or allow)"
            )),
        }
    }
}

/// The answer for one address: the most specific matching entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verdict {
    /// 0 (worst) to 100 (best).
    pub score: u8,
    /// What to do.
    pub action: Action,
    /// Index into the snapshot's reason table ([`Snapshot::reason`]).
    pub reason: u16,
    /// Unix seconds after which the entry no longer applies; 0 = never.
    pub expires: u64,
}

impl Verdict {
    /// Whether the entry still applies at `now_unix`.
    pub fn live(&self, now_unix: u64) -> bool {
        self.expires == 0 || now_unix < self.expires
    }
}

/// Store errors. Every one says which file and, for text input, which line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A snapshot file is not one, is from another version, or is damaged.
    #[error("{path}: not a usable snapshot: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What check failed.
        why: String,
    },
    /// A CSV or delta line is malformed.
    #[error("{path}:{line}: {why}")]
    Parse {
        /// The file (or feed URL).
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// A delta is well-formed but cannot follow the current data.
    #[error("{source_name}: delta {from}→{to} does not follow watermark {current}")]
    OutOfOrder {
        /// The delta's file or URL.
        source_name: String,
        /// The delta's base watermark.
        from: u64,
        /// The delta's result watermark.
        to: u64,
        /// The store's watermark.
        current: u64,
    },
    /// A signed snapshot put in place of the one in force is older (a lower
    /// watermark): an old signed file cannot take the store back in time.
    #[error(
        "{path}: watermark {watermark} is older than the store's {current}; a replacement must not go back"
    )]
    Rollback {
        /// The snapshot file.
        path: PathBuf,
        /// Its watermark.
        watermark: u64,
        /// The store's.
        current: u64,
    },
    /// A snapshot that must be signed is not, or not by the configured key
    /// (and is not one this store wrote itself).
    #[error("{path}: {why}")]
    Untrusted {
        /// The snapshot file.
        path: PathBuf,
        /// No signature at all (rather than a wrong one).
        missing: bool,
        /// What is wrong.
        why: String,
    },
    /// More distinct reasons or verdicts than the format can index.
    #[error("too many distinct {what} (at most {max})")]
    TooMany {
        /// "reasons" or "verdicts".
        what: &'static str,
        /// The format's limit.
        max: usize,
    },
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
