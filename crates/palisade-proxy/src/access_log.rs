//! The access log: one line per request, in the combined format that
//! nginx, Apache, fail2ban and CrowdSec read, or as JSON, to stderr or a
//! file.
//!
//! The request path never waits for a disk: a line is formatted into a
//! pooled buffer and handed to a writer thread over a bounded queue; when
//! the queue is full the line is dropped and counted
//! (`palisade_access_log_dropped_total`). An attacker cannot make the log
//! the amplifier either: allowed requests are always written, refusals
//! only up to `refusal_budget` a second, and one line a second says how
//! many were left out, by decision. Every byte a client chose is escaped,
//! so no request can forge a line.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Version;
use palisade_core::{NANOS_PER_SEC, Nanos, RejectReason};
use prometheus_client::metrics::counter::Counter;

/// Lines waiting for the writer at most; past it lines are dropped.
const QUEUE_LINES: usize = 8192;
/// A fresh buffer's size: a typical line fits without growing.
const LINE_CAPACITY: usize = 512;
/// Buffers bigger than this (a huge header once) are not kept for reuse.
const KEEP_CAPACITY: usize = 16 * 1024;
/// The writer hands this much to one `write` at most.
const BATCH_BYTES: usize = 64 * 1024;

/// `access_log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// nginx's `combined`, with Palisade's fields appended as `key=value`.
    Combined,
    /// One JSON object per line.
    Json,
}

/// `access_log.path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The daemon's stderr (beside its own log).
    Stderr,
    /// A file, created `0640`, appended to, reopened on SIGUSR1.
    File(PathBuf),
}

/// `[access_log]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogSettings {
    /// Line format.
    pub format: Format,
    /// Where lines go.
    pub destination: Destination,
    /// Refusal lines per second at most; the rest are only counted.
    pub refusal_budget: u32,
}

/// The decision of a request answered 400 before any control: its path
/// or `Host` was ambiguous (no decision was made).
pub const BAD_REQUEST: &str = "bad_request";

/// What a line not written for the budget was, in the order suppression
/// lines name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Refused by a control.
    Decision(RejectReason),
    /// A challenge page served.
    Challenge,
    /// Answered 400 before any control ([`BAD_REQUEST`]).
    BadRequest,
}

const REFUSALS: usize = 7;

impl Refusal {
    fn index(self) -> usize {
        match self {
            Self::Decision(RejectReason::RateLimited) => 0,
            Self::Decision(RejectReason::Reputation) => 1,
            Self::Decision(RejectReason::Denylisted) => 2,
            Self::Decision(RejectReason::BreakerOpen) => 3,
            Self::Decision(RejectReason::ClientBreakerOpen) => 4,
            Self::Challenge => 5,
            Self::BadRequest => 6,
        }
    }

    fn name(index: usize) -> &'static str {
        match index {
            0 => RejectReason::RateLimited.as_str(),
            1 => RejectReason::Reputation.as_str(),
            2 => RejectReason::Denylisted.as_str(),
            3 => RejectReason::BreakerOpen.as_str(),
            4 => RejectReason::ClientBreakerOpen.as_str(),
            5 => crate::challenge::ISSUED,
            _ => BAD_REQUEST,
        }
    }
}

/// How many refusal lines each second may carry; the others are counted
/// by decision until the writer reports them.
#[derive(Debug)]
pub struct RefusalBudget {
    per_second: u64,
    /// `(second << 32) | lines granted in it`.
    state: AtomicU64,
    suppressed: [AtomicU64; REFUSALS],
}

impl RefusalBudget {
    /// A budget of `per_second` lines.
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second: u64::from(per_second),
            state: AtomicU64::new(0),
            suppressed: Default::default(),
        }
    }

    /// Whether a refusal at `now` (clock nanos) may be written; when not,
    /// it is counted for the next suppression line.
    pub fn take(&self, now: Nanos, refusal: Refusal) -> bool {
        let second = now / NANOS_PER_SEC;
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            // A thread whose clock read is a little older than another's
            // counts against the newer second rather than resetting it.
            let fresh = cur >> 32 < second;
            let used = if fresh { 0 } else { cur & u64::from(u32::MAX) };
            if used >= self.per_second {
                self.suppressed[refusal.index()].fetch_add(1, Ordering::Relaxed);
                return false;
            }
            let next = if fresh { (second << 32) | 1 } else { cur + 1 };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }

    /// The refusals suppressed since the last call, by decision (only
    /// those with any), and resets them.
    pub fn drain_suppressed(&self) -> Vec<(&'static str, u64)> {
        self.suppressed
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match n.swap(0, Ordering::Relaxed) {
                0 => None,
                n => Some((Refusal::name(i), n)),
            })
            .collect()
    }
}

/// The request's side of a line, formatted when the request arrived
/// (what the client sent), completed by [`AccessLog::finish`].
pub struct Pending {
    buf: Vec<u8>,
    /// Ends, in `buf`, of the method, target, protocol, referer, user
    /// agent and JA4, each already escaped for the format.
    ends: [usize; 6],
    client: IpAddr,
    peer: IpAddr,
}

/// How a request ended, for its line.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Status answered (499: the client went away first).
    pub status: u16,
    /// Body bytes of the answer, when known.
    pub bytes: Option<u64>,
    /// `allowed` or the refusal's name, as in `palisade_decisions_total`.
    pub decision: &'static str,
    /// The upstream's status, when an upstream answered.
    pub upstream_status: Option<u16>,
    /// Time to the response head (as the latency histogram measures).
    pub latency: Nanos,
    /// Wall-clock time of the line, Unix milliseconds.
    pub unix_ms: u64,
}

enum Msg {
    /// A line: `buf[start..]` is written, the buffer comes back to the pool.
    Line(Vec<u8>, usize),
    Reopen,
}

/// The access log of a running daemon.
pub struct AccessLog {
    format: Format,
    queue: SyncSender<Msg>,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    budget: Arc<RefusalBudget>,
    dropped: Counter,
    /// A reopen waits here when the queue is full.
    reopen: Arc<AtomicBool>,
}

impl AccessLog {
    /// Opens the destination and starts the writer thread; lines the
    /// queue cannot take are counted in `dropped`.
    pub fn start(settings: &AccessLogSettings, dropped: Counter) -> io::Result<Self> {
        let sink = Sink::open(&settings.destination)?;
        let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        let pool = Arc::new(Mutex::new(Vec::new()));
        let budget = Arc::new(RefusalBudget::new(settings.refusal_budget));
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            rx,
            sink,
            format: settings.format,
            pool: pool.clone(),
            budget: budget.clone(),
            reopen: reopen.clone(),
        };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run())?;
        Ok(Self {
            format: settings.format,
            queue,
            pool,
            budget,
            dropped,
            reopen,
        })
    }

    /// Whether a refusal line may be written now (see [`RefusalBudget`]).
    pub fn allow_refusal(&self, now: Nanos, refusal: Refusal) -> bool {
        self.budget.take(now, refusal)
    }

    /// Formats what the client sent, into a pooled buffer.
    pub fn begin(&self, req: &RequestInfo<'_>) -> Pending {
        let buf = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(LINE_CAPACITY));
        Pending::new(self.format, buf, req)
    }

    /// Completes the line and queues it; a full queue drops it (counted).
    pub fn finish(&self, p: Pending, o: &Outcome) {
        let (buf, start) = render(self.format, p, o);
        match self.queue.try_send(Msg::Line(buf, start)) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Line(buf, _))) => {
                self.dropped.inc();
                self.recycle(buf);
            }
            Err(_) => {
                self.dropped.inc();
            }
        }
    }

    /// Gives back the buffer of a line that is not written after all.
    pub fn discard(&self, p: Pending) {
        self.recycle(p.buf);
    }

    fn recycle(&self, mut buf: Vec<u8>) {
        if buf.capacity() <= KEEP_CAPACITY {
            buf.clear();
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < QUEUE_LINES {
                pool.push(buf);
            }
        }
    }

    /// Line buffers back from the writer, ready for reuse: in steady
    /// state a line allocates nothing.
    pub fn idle_buffers(&self) -> usize {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Closes and reopens the file (after logrotate moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        // A full queue is drained soon; the flag is seen then.
        let _ = self.queue.try_send(Msg::Reopen);
    }
}

/// What the client sent, as it is logged. `referer` and `user_agent`
/// are raw header bytes.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The resolved client (the peer, or who a trusted proxy named).
    pub client: IpAddr,
    /// The TCP peer.
    pub peer: IpAddr,
    /// Request method.
    pub method: &'a str,
    /// Path and query.
    pub target: &'a str,
    /// HTTP version.
    pub version: Version,
    /// `Referer`, when sent.
    pub referer: Option<&'a [u8]>,
    /// `User-Agent`, when sent.
    pub user_agent: Option<&'a [u8]>,
    /// The connection's JA4 TLS fingerprint (none on plain HTTP).
    pub ja4: Option<&'a str>,
}

impl Pending {
    fn new(format: Format, mut buf: Vec<u8>, req: &RequestInfo<'_>) -> Self {
        let mut ends = [0; 6];
        let fields = [
            Some(req.method.as_bytes()),
            Some(req.target.as_bytes()),
            Some(protocol(req.version).as_bytes()),
            req.referer,
            req.user_agent,
            req.ja4.map(str::as_bytes),
        ];
        for (end, field) in ends.iter_mut().zip(fields) {
            match format {
                Format::Combined => match field {
                    Some(v) if !v.is_empty() => escape_combined(v, &mut buf),
                    _ => buf.push(b'-'),
                },
                Format::Json => match field {
                    Some(v) => escape_json(v, &mut buf),
                    None => buf.extend_from_slice(b"null"),
                },
            }
            *end = buf.len();
        }
        Self {
            buf,
            ends,
            client: req.client,
            peer: req.peer,
        }
    }
}

/// The whole line, appended to the pending buffer: `(buffer, start)`.
fn render(format: Format, p: Pending, o: &Outcome) -> (Vec<u8>, usize) {
    let Pending {
        mut buf,
        ends,
        client,
        peer,
    } = p;
    let start = buf.len();
    let field = |i: usize| (if i == 0 { 0 } else { ends[i - 1] })..ends[i];
    // Writing into a Vec cannot fail.
    let _ = match format {
        Format::Combined => {
            let _ = write!(buf, "{client} - - [");
            clf_time(o.unix_ms / 1000, &mut buf);
            buf.extend_from_slice(b"] \"");
            buf.extend_from_within(field(0));
            buf.push(b' ');
            buf.extend_from_within(field(1));
            buf.push(b' ');
            buf.extend_from_within(field(2));
            let _ = write!(buf, "\" {} ", o.status);
            match o.bytes {
                Some(n) => {
                    let _ = write!(buf, "{n}");
                }
                None => buf.push(b'-'),
            }
            buf.extend_from_slice(b" \"");
            buf.extend_from_within(field(3));
            buf.extend_from_slice(b"\" \"");
            buf.extend_from_within(field(4));
            let _ = write!(buf, "\" peer={peer} decision={} upstream_status=", o.decision);
            match o.upstream_status {
                Some(s) => {
                    let _ = write!(buf, "{s}");
                }
                None => buf.push(b'-'),
            }
            let _ = write!(buf, " latency_ms={:.3} ja4=", o.latency as f64 / 1e6);
            buf.extend_from_within(field(5));
            writeln!(buf)
        }
        Format::Json => {
            buf.extend_from_slice(b"{\"time\":\"");
            iso_time(o.unix_ms, &mut buf);
            let _ = write!(buf, "\",\"client\":\"{client}\",\"peer\":\"{peer}\",\"method\":");
            buf.extend_from_within(field(0));
            buf.extend_from_slice(b",\"target\":");
            buf.extend_from_within(field(1));
            buf.extend_from_slice(b",\"protocol\":");
            buf.extend_from_within(field(2));
            let _ = write!(buf, ",\"status\":{},\"bytes\":", o.status);
            json_number(o.bytes, &mut buf);
            buf.extend_from_slice(b",\"referer\":");
            buf.extend_from_within(field(3));
            buf.extend_from_slice(b",\"user_agent\":");
            buf.extend_from_within(field(4));
            let _ = write!(buf, ",\"decision\":\"{}\",\"upstream_status\":", o.decision);
            json_number(o.upstream_status.map(u64::from), &mut buf);
            let _ = write!(buf, ",\"latency_ms\":{:.3},\"ja4\":", o.latency as f64 / 1e6);
            buf.extend_from_within(field(5));
            writeln!(buf, "}}")
        }
    };
    (buf, start)
}

enum Sink {
    Stderr,
    File(File, PathBuf),
}

impl Sink {
    fn open(dest: &Destination) -> io::Result<Self> {
        match dest {
            Destination::Stderr => Ok(Self::Stderr),
            Destination::File(path) => Ok(Self::File(open_file(path)?, path.clone())),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            // One locked write: the daemon's own log lines cannot land
            // inside an access log line.
            Self::Stderr => io::stderr().lock().write_all(bytes),
            Self::File(f, _) => f.write_all(bytes),
        }
    }

    fn reopen(&mut self) {
        if let Self::File(f, path) = self {
            match open_file(path) {
                Ok(new) => {
                    *f = new;
                    tracing::info!(path = %path.display(), "access log reopened");
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), "access log not reopened, still writing the old file: {e}")
                }
            }
        }
    }
}

fn open_file(path: &std::path::Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("access_log.path {}: {e}", path.display())))
}

struct Writer {
    rx: Receiver<Msg>,
    sink: Sink,
    format: Format,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    budget: Arc<RefusalBudget>,
    reopen: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH_BYTES);
        let mut spent: Vec<Vec<u8>> = Vec::new();
        let mut second = palisade_core::unix_now();
        let mut failing = false;
        loop {
            let first = self.rx.recv_timeout(Duration::from_secs(1));
            let mut msg = match first {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            while let Some(m) = msg.take() {
                match m {
                    Msg::Line(buf, start) => {
                        batch.extend_from_slice(buf.get(start..).unwrap_or_default());
                        spent.push(buf);
                    }
                    Msg::Reopen => {}
                }
                if batch.len() < BATCH_BYTES {
                    msg = self.rx.try_recv().ok();
                }
            }
            let now = palisade_core::unix_now();
            if now != second {
                second = now;
                let suppressed = self.budget.drain_suppressed();
                if !suppressed.is_empty() {
                    suppression_line(self.format, palisade_core::unix_now_ms(), &suppressed, &mut batch);
                }
            }
            if !batch.is_empty() {
                match self.sink.write(&batch) {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!("access log write failed (lines lost until it works again): {e}");
                    }
                    Err(_) => {}
                }
                batch.clear();
            }
            if self.reopen.swap(false, Ordering::AcqRel) {
                self.sink.reopen();
            }
            if !spent.is_empty() {
                let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                for mut buf in spent.drain(..) {
                    if buf.capacity() <= KEEP_CAPACITY && pool.len() < QUEUE_LINES {
                        buf.clear();
                        pool.push(buf);
                    }
                }
            }
        }
    }
}

/// The line that says how many refusals were not written. Its combined
/// form starts with `[`, so no access log parser takes it for a request.
fn suppression_line(format: Format, unix_ms: u64, counts: &[(&str, u64)], out: &mut Vec<u8>) {
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    match format {
        Format::Combined => {
            out.push(b'[');
            clf_time(unix_ms / 1000, out);
            let _ = write!(
                out,
                "] palisade: {total} refusals not logged (over access_log.refusal_budget):"
            );
            for (decision, n) in counts {
                let _ = write!(out, " {decision}={n}");
            }
            out.push(b'\n');
        }
        Format::Json => {
            out.extend_from_slice(b"{\"time\":\"");
            iso_time(unix_ms, out);
            let _ = write!(out, "\",\"suppressed\":{total},\"suppressed_by_decision\":{{");
            for (i, (decision, n)) in counts.iter().enumerate() {
                let comma = if i == 0 { "" } else { "," };
                let _ = write!(out, "{comma}\"{decision}\":{n}");
            }
            out.extend_from_slice(b"}}\n");
        }
    }
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// nginx's escaping: `"`, `\`, control bytes and anything not ASCII
/// become `\xHH`, so a value cannot end its field or its line.
fn escape_combined(v: &[u8], out: &mut Vec<u8>) {
    for &b in v {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            out.extend_from_slice(&[b'\\', b'x', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        } else {
            out.push(b);
        }
    }
}

/// A JSON string. Valid UTF-8 stays readable; each byte of a value that
/// is not UTF-8 is written as the code point of the same number, so the
/// line stays valid JSON whatever the client sent.
fn escape_json(v: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    match std::str::from_utf8(v) {
        Ok(s) => {
            for c in s.chars() {
                match c {
                    '"' => out.extend_from_slice(b"\\\""),
                    '\\' => out.extend_from_slice(b"\\\\"),
                    // Controls, DEL and the JavaScript line separators.
                    c if c < ' ' || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                        let _ = write!(out, "\\u{:04x}", u32::from(c));
                    }
                    c => {
                        let mut utf8 = [0; 4];
                        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                    }
                }
            }
        }
        Err(_) => {
            for &b in v {
                match b {
                    b'"' => out.extend_from_slice(b"\\\""),
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    0x20..0x7f => out.push(b),
                    _ => {
                        let _ = write!(out, "\\u{:04x}", b);
                    }
                }
            }
        }
    }
    out.push(b'"');
}

fn json_number(n: Option<u64>, out: &mut Vec<u8>) {
    match n {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// (year, month 1-12, day) of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn split(unix: u64) -> ((i64, u32, u32), u64, u64, u64) {
    let days = i64::try_from(unix / 86_400).unwrap_or(0);
    let rem = unix % 86_400;
    (civil(days), rem / 3600, rem / 60 % 60, rem % 60)
}

/// `03/Dec/2026:12:50:24 +0000`, the combined format's time (UTC).
fn clf_time(unix: u64, out: &mut Vec<u8>) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let ((y, m, d), hh, mm, ss) = split(unix);
    let month = MONTHS.get(m as usize - 1).copied().unwrap_or("Jan");
    let _ = write!(out, "{d:02}/{month}/{y}:{hh:02}:{mm:02}:{ss:02} +0000");
}

/// `2026-12-03T12:50:24.123Z`.
fn iso_time(unix_ms: u64, out: &mut Vec<u8>) {
    let ((y, m, d), hh, mm, ss) = split(unix_ms / 1000);
    let ms = unix_ms % 1000;
    let _ = write!(out, "{y}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        let mut out = Vec::new();
        // 2026-12-03T12:50:24Z
        clf_time(1_796_302_224, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "03/Dec/2026:12:50:24 +0000");
        let mut out = Vec::new();
        // A leap day, and milliseconds.
        iso_time(951_782_400_007, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "2000-02-29T00:00:00.007Z");
        let mut out = Vec::new();
        clf_time(0, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "01/Jan/1970:00:00:00 +0000");
    }

    #[test]
    fn escaping_leaves_no_quote_backslash_or_control() {
        let hostile = b"a\"b\\c\nd\re\x1b[31mf\x7f\xff";
        let mut out = Vec::new();
        escape_combined(hostile, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"a\x22b\x5Cc\x0Ad\x0De\x1B[31mf\x7F\xFF"#
        );
        let mut out = Vec::new();
        escape_json(hostile, &mut out);
        let s: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(s, "a\"b\\c\nd\re\u{1b}[31mf\u{7f}\u{ff}");
        let mut out = Vec::new();
        escape_json("é\u{2028}\"\n".as_bytes(), &mut out);
        assert!(!out.contains(&b'\n'));
        let s: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(s, "é\u{2028}\"\n");
    }

    #[test]
    fn budget_grants_per_second_and_counts_the_rest() {
        let b = RefusalBudget::new(3);
        let s = NANOS_PER_SEC;
        let granted = (0..10)
            .filter(|i| {
                let reason = if i % 2 == 0 {
                    RejectReason::RateLimited
                } else {
                    RejectReason::Reputation
                };
                b.take(5 * s + 10, Refusal::Decision(reason))
            })
            .count();
        assert_eq!(granted, 3);
        // 0, 2 and 1 were granted; 4, 6, 8 and 3, 5, 7, 9 were not.
        assert_eq!(
            b.drain_suppressed(),
            vec![("rate_limited", 3), ("reputation_blocked", 4)]
        );
        assert_eq!(b.drain_suppressed(), vec![]);
        // A late reading of the past second counts against the current one.
        assert!(!b.take(4 * s, Refusal::Decision(RejectReason::Denylisted)));
        assert_eq!(b.drain_suppressed(), vec![("denylisted", 1)]);
        // A new second, a new budget.
        assert!((0..3).all(|_| b.take(6 * s, Refusal::BadRequest)));
        assert!(!b.take(6 * s + s - 1, Refusal::Decision(RejectReason::RateLimited)));
        assert_eq!(b.drain_suppressed(), vec![("rate_limited", 1)]);
    }

    #[test]
    fn zero_budget_writes_no_refusal() {
        let b = RefusalBudget::new(0);
        assert!(!b.take(NANOS_PER_SEC, Refusal::Decision(RejectReason::RateLimited)));
        assert!(!b.take(9 * NANOS_PER_SEC, Refusal::Decision(RejectReason::RateLimited)));
        assert_eq!(b.drain_suppressed(), vec![("rate_limited", 2)]);
    }

    fn line(format: Format, referer: Option<&[u8]>, ja4: Option<&str>) -> String {
        let req = RequestInfo {
            client: "203.0.113.9".parse().unwrap(),
            peer: "10.0.0.1".parse().unwrap(),
            method: "GET",
            target: "/a?b=\"c\"",
            version: Version::HTTP_2,
            referer,
            user_agent: Some(b"curl/8\n1.2.3.4 - - [x] \"GET / HTTP/1.1\" 200"),
            ja4,
        };
        let o = Outcome {
            status: 429,
            bytes: Some(18),
            decision: "rate_limited",
            upstream_status: None,
            latency: 1_234_567,
            unix_ms: 1_796_302_224_005,
        };
        let (buf, start) = render(format, Pending::new(format, Vec::new(), &req), &o);
        String::from_utf8(buf[start..].to_vec()).unwrap()
    }

    #[test]
    fn combined_line_has_every_field() {
        assert_eq!(
            line(Format::Combined, None, None),
            "203.0.113.9 - - [03/Dec/2026:12:50:24 +0000] \"GET /a?b=\\x22c\\x22 HTTP/2.0\" 429 18 \"-\" \
             \"curl/8\\x0A1.2.3.4 - - [x] \\x22GET / HTTP/1.1\\x22 200\" peer=10.0.0.1 decision=rate_limited \
             upstream_status=- latency_ms=1.235 ja4=-\n"
        );
        assert!(
            line(
                Format::Combined,
                None,
                Some("t13d1516h2_8daaf6152771_e5627efa2ab1")
            )
            .ends_with(" latency_ms=1.235 ja4=t13d1516h2_8daaf6152771_e5627efa2ab1\n")
        );
    }

    #[test]
    fn json_line_parses() {
        let l = line(
            Format::Json,
            Some(b"https://example.com/"),
            Some("t13d1516h2_8daaf6152771_e5627efa2ab1"),
        );
        assert_eq!(l.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["time"], "2026-12-03T12:50:24.005Z");
        assert_eq!(v["client"], "203.0.113.9");
        assert_eq!(v["peer"], "10.0.0.1");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["target"], "/a?b=\"c\"");
        assert_eq!(v["protocol"], "HTTP/2.0");
        assert_eq!(v["status"], 429);
        assert_eq!(v["bytes"], 18);
        assert_eq!(v["referer"], "https://example.com/");
        assert_eq!(v["user_agent"], "curl/8\n1.2.3.4 - - [x] \"GET / HTTP/1.1\" 200");
        assert_eq!(v["decision"], "rate_limited");
        assert_eq!(v["upstream_status"], serde_json::Value::Null);
        assert_eq!(v["latency_ms"], 1.235);
        assert_eq!(v["ja4"], "t13d1516h2_8daaf6152771_e5627efa2ab1");
        let plain: serde_json::Value = serde_json::from_str(&line(Format::Json, None, None)).unwrap();
        assert_eq!(plain["ja4"], serde_json::Value::Null);
    }

    #[test]
    fn suppression_lines_name_each_decision() {
        let counts = [("rate_limited", 950), ("denylisted", 3)];
        let mut out = Vec::new();
        suppression_line(Format::Combined, 1_796_302_224_000, &counts, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[03/Dec/2026:12:50:24 +0000] palisade: 953 refusals not logged (over access_log.refusal_budget): \
             rate_limited=950 denylisted=3\n"
        );
        let mut out = Vec::new();
        suppression_line(Format::Json, 1_796_302_224_000, &counts, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["suppressed"], 953);
        assert_eq!(v["suppressed_by_decision"]["rate_limited"], 950);
        assert_eq!(v["suppressed_by_decision"]["denylisted"], 3);
    }
}
