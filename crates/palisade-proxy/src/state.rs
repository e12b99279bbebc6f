//! Durable learned state: reputation penalties and operator-set scores go
//! through a write-ahead log (palisade-store's `StateLog`) so that a restart,
//! even after `kill -9`, resumes with them.
//!
//! A dedicated thread owns the log and group-commits: whatever queued while
//! the previous `fdatasync` ran is written with the next one. Operator
//! changes wait for their fsync before the API answers; automatic
//! penalties are queued without waiting (a full queue drops and counts).

use ipnet::IpNet;
use palisade_core::{ClientKey, Nanos, unix_now, unix_now_ms};
use palisade_limits::reputation::Reputation;
use palisade_store::{Action, LogEntry, StateLog};
use std::net::IpAddr;
use tokio::sync::{mpsc, oneshot};

use crate::config::StateSettings;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{KindLabel, Metrics};

const QUEUE: usize = 65_536;
const BATCH: usize = 4096;

struct Msg {
    entries: Vec<LogEntry>,
    ack: Option<oneshot::Sender<Result<(), String>>>,
}

/// Handle to the log's writer thread.
pub struct DurableState {
    tx: mpsc::Sender<Msg>,
}

/// What was restored at start.
#[derive(Debug, Clone, Copy, Default)]
pub struct Restored {
    /// Clients whose score was restored.
    pub clients: usize,
    /// Log records replayed.
    pub replayed: u64,
    /// Damaged log bytes dropped.
    pub dropped_bytes: u64,
}

/// The log entry for a client's score as it is now. `None` for keys that
/// are not addresses (fingerprints are not persisted).
pub fn entry_for(rep: &Reputation, key: &ClientKey, prefix: u8, now: Nanos) -> Option<LogEntry> {
    let score = rep.score(key, now);
    Some(LogEntry {
        score: Some(score.floor().clamp(0.0, 100.0) as u8),
        expires: rep.settle_secs(score).map_or(0, |s| unix_now() + s.max(1)),
        ..cleared(key, prefix)?
    })
}

/// The log entry that forgets a client.
pub fn cleared(key: &ClientKey, prefix: u8) -> Option<LogEntry> {
    let net = match *key {
        ClientKey::V4(v) => IpNet::from(IpAddr::from(v.to_be_bytes())),
        ClientKey::V6(v) => IpNet::new(IpAddr::from(v.to_be_bytes()), prefix).ok()?,
        ClientKey::Fingerprint(_) => return None,
    };
    Some(LogEntry {
        net,
        score: None,
        action: Action::Score,
        expires: 0,
        at_ms: unix_now_ms(),
    })
}

impl DurableState {
    /// Opens the log, restores what it holds into `rep`, and starts the
    /// writer thread.
    pub fn open(
        settings: &StateSettings,
        rep: Option<&Reputation>,
        prefix: u8,
        now: Nanos,
        metrics: &Metrics,
    ) -> Result<(Self, Restored), String> {
        let (log, recovery) = StateLog::open(&settings.data_dir, settings.max_entries, unix_now())
            .map_err(|e| e.to_string())?;
        for w in &recovery.warnings {
            tracing::error!("durable state: {w}");
        }
        let mut restored = Restored {
            clients: 0,
            replayed: recovery.replayed,
            dropped_bytes: recovery.dropped_bytes,
        };
        if let Some(rep) = rep {
            let now_ms = unix_now_ms();
            for e in &recovery.entries {
                let Some(score) = e.score else { continue };
                let key = ClientKey::from_ip(e.net.addr(), prefix);
                rep.restore(&key, score, now_ms.saturating_sub(e.at_ms), now);
                restored.clients += 1;
            }
        } else if !recovery.entries.is_empty() {
            tracing::warn!(
                clients = recovery.entries.len(),
                "durable state holds scores but reputation is disabled: not applied"
            );
        }
        metrics.state_entries.set(log.len() as i64);
        let (tx, rx) = mpsc::channel(QUEUE);
        let gauges = (metrics.state_records.clone(), metrics.state_entries.clone());
        std::thread::Builder::new()
            .name("palisade-state".into())
            .spawn(move || writer(log, rx, &gauges.0, &gauges.1))
            .map_err(|e| format!("starting the state writer: {e}"))?;
        Ok((Self { tx }, restored))
    }

    /// Logs entries and waits until they are on disk.
    pub async fn record(&self, entries: Vec<LogEntry>) -> Result<(), String> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Msg {
                entries,
                ack: Some(ack),
            })
            .await
            .map_err(|_| "the state writer has stopped".to_owned())?;
        done.await
            .map_err(|_| "the state writer has stopped".to_owned())?
    }

    /// Queues an entry without waiting. Returns false (and the caller
    /// counts it) when the queue is full.
    pub fn record_later(&self, entry: LogEntry) -> bool {
        self.tx
            .try_send(Msg {
                entries: vec![entry],
                ack: None,
            })
            .is_ok()
    }
}

fn writer(
    mut log: StateLog,
    mut rx: mpsc::Receiver<Msg>,
    records: &Family<KindLabel, Counter>,
    live: &Gauge,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let entries: Vec<LogEntry> = batch.iter().flat_map(|m| m.entries.iter().copied()).collect();
        let result = log.append(&entries).map_err(|e| e.to_string());
        let kind = if result.is_ok() { "written" } else { "failed" };
        records
            .get_or_create(&KindLabel { kind })
            .inc_by(entries.len() as u64);
        if let Err(e) = &result {
            tracing::error!("durable state: {e}");
        }
        for m in batch {
            if let Some(ack) = m.ack {
                let _ = ack.send(result.clone());
            }
        }
        if log.wants_compaction()
            && let Err(e) = log.compact(unix_now())
        {
            tracing::error!("durable state compaction: {e}");
        }
        live.set(log.len() as i64);
    }
}
