//! The live store: one atomically swapped snapshot, plus what the feed did.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;

use crate::sign::PublicKey;
use crate::{BuildOptions, Delta, Result, Snapshot, Verdict};

/// What the feed has done, for `GET /api/v1/store` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedStatus {
    /// Deltas applied since start.
    pub applied: u64,
    /// Deltas rejected since start (corrupt, truncated, out of order).
    pub rejected: u64,
    /// Snapshot swaps since start (deltas and reloads).
    pub swaps: u64,
    /// The latest rejection, until the next success.
    pub last_error: Option<String>,
}

/// A snapshot readers can query without locks while writers replace it.
/// Readers hold an `Arc` for the length of one lookup; a swap is a single
/// atomic pointer store, so no reader ever sees a half-applied delta.
pub struct StoreCell {
    current: ArcSwap<Snapshot>,
    /// Where applied deltas are persisted (the snapshot's own file).
    path: Option<PathBuf>,
    /// With a key, a snapshot read from `path` must be signed by it (or
    /// written by us).
    key: Option<PublicKey>,
    /// Serialises writers: two deltas must not both build on one base.
    writer: Mutex<FeedStatus>,
    /// The file the latest applied delta was written to, as it was written.
    written: Mutex<Option<std::fs::Metadata>>,
}

impl StoreCell {
    /// Wraps a snapshot. With `path`, applied deltas are written back there
    /// (atomically) so a restart resumes at the new watermark.
    pub fn new(snapshot: Snapshot, path: Option<PathBuf>) -> Self {
        Self {
            current: ArcSwap::from_pointee(snapshot),
            path,
            key: None,
            writer: Mutex::new(FeedStatus::default()),
            written: Mutex::new(None),
        }
    }

    /// Opens a snapshot file; deltas will be persisted to it.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_trusted(path, None)
    }

    /// Opens a snapshot file that, with `key`, must be signed by it (see
    /// [`Snapshot::open_trusted`]); so must every file [`Self::reload`]
    /// reads later. Deltas will be persisted to it, and recorded as ours.
    pub fn open_trusted(path: &Path, key: Option<PublicKey>) -> Result<Self> {
        let mut cell = Self::new(Snapshot::open_trusted(path, key.as_ref())?, Some(path.to_owned()));
        cell.key = key;
        Ok(cell)
    }

    /// The key snapshots must be signed with.
    pub fn key(&self) -> Option<PublicKey> {
        self.key
    }

    fn status_lock(&self) -> MutexGuard<'_, FeedStatus> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current snapshot (hold it only briefly: it pins that version).
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The verdict for `ip` in the current snapshot.
    #[inline]
    pub fn lookup(&self, ip: IpAddr, now_unix: u64) -> Option<Verdict> {
        self.current.load().lookup(ip, now_unix)
    }

    /// Replaces the snapshot (e.g. after the file was rebuilt).
    pub fn replace(&self, snapshot: Snapshot) {
        let mut status = self.status_lock();
        self.swap(snapshot);
        status.swaps += 1;
        status.last_error = None;
    }

    /// Swaps and frees the old snapshot here, not in a reader: a reader
    /// whose guard turned out to be the last owner would pay the unmap
    /// (milliseconds for a large store) in the middle of a request.
    fn swap(&self, next: Snapshot) {
        let old = self.current.swap(Arc::new(next));
        // Readers hold a snapshot for one lookup; give them up to a second.
        for _ in 0..100_000 {
            if Arc::strong_count(&old) == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(10));
        }
        drop(old);
    }

    /// Re-opens the backing file (after `palisade store build` replaced it).
    /// With a key, the file must not be older than the store in force: the
    /// publisher's old snapshots and signatures are public, and one put
    /// back would undo every change since (and let its old deltas be
    /// replayed).
    pub fn reload(&self) -> Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let snapshot = Snapshot::open_trusted(path, self.key.as_ref()).inspect_err(|e| self.reject(e))?;
        let current = self.current.load().watermark();
        if self.key.is_some() && snapshot.watermark() < current {
            let e = crate::Error::Rollback {
                path: path.clone(),
                watermark: snapshot.watermark(),
                current,
            };
            self.reject(&e);
            return Err(e);
        }
        self.replace(snapshot);
        Ok(())
    }

    /// Parses, verifies and applies a delta: build the next snapshot aside,
    /// persist it, swap it in. Any failure leaves the current data serving
    /// and is recorded in [`Self::status`]. Returns whether anything changed
    /// (`false` when the delta was already applied).
    pub fn apply_delta(&self, text: &str, source: &str, opts: BuildOptions) -> Result<bool> {
        let mut status = self.status_lock();
        let result: Result<bool> = (|| {
            let delta = Delta::parse(text, source)?;
            let Some(next) = self.current.load().apply(&delta, source, opts)? else {
                return Ok(false);
            };
            let next = match &self.path {
                Some(path) => {
                    if self.key.is_some() {
                        // Unsigned, but built here from a verified base and
                        // verified deltas: a restart must accept it.
                        crate::sign::record_written(path, next.as_bytes())?;
                    }
                    let meta = crate::snapshot::write_atomically_meta(path, next.as_bytes())?;
                    *self.written.lock().unwrap_or_else(PoisonError::into_inner) = Some(meta);
                    // Served from memory as built, not read back: a file
                    // renamed over ours meanwhile must not be served unchecked.
                    next.named(path)
                }
                None => next,
            };
            self.swap(next);
            Ok(true)
        })();
        match &result {
            Ok(true) => {
                status.applied += 1;
                status.swaps += 1;
                status.last_error = None;
            }
            Ok(false) => {}
            Err(e) => {
                status.rejected += 1;
                status.last_error = Some(e.to_string());
            }
        }
        result
    }

    /// Records a failure that happened before a delta could be parsed (a
    /// feed that could not be fetched, a file that could not be read).
    pub fn reject(&self, why: &dyn std::fmt::Display) {
        let mut status = self.status_lock();
        status.rejected += 1;
        status.last_error = Some(why.to_string());
    }

    /// Counters and the latest error.
    pub fn status(&self) -> FeedStatus {
        self.status_lock().clone()
    }

    /// Metadata (inode, length, mtime) of the file the latest applied delta
    /// was written to: a file at [`Self::path`] that does not match it was
    /// put there by someone else.
    pub fn written(&self) -> Option<std::fs::Metadata> {
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The file deltas are persisted to.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl std::fmt::Debug for StoreCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCell")
            .field("snapshot", &*self.current.load())
            .field("path", &self.path)
            .finish()
    }
}
