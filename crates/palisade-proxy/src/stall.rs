//! HTTP/2 responses that make no progress towards the client.
//!
//! On HTTP/1.1 a client that stops reading fills its socket, and the write
//! deadline in `io.rs` closes the connection. On HTTP/2 a client can keep
//! its flow-control window shut instead (`SETTINGS_INITIAL_WINDOW_SIZE = 0`,
//! no `WINDOW_UPDATE`) while answering PINGs: nothing waits on the socket,
//! so no write stalls, and each response body, with the upstream
//! connection behind it, waits forever.
//!
//! hyper runs every HTTP/2 stream as a task of the connection's executor.
//! [`StreamExecutor`] puts a progress deadline on each: a response that
//! started and then is not asked for its next chunk for
//! `server.write_timeout`, while no chunk is awaited from the upstream, is
//! dropped. Dropping it resets the stream (`RST_STREAM`) and drops the
//! upstream body, which closes that upstream connection. When a stream
//! stalls and no stream of its connection made progress within the
//! deadline, the connection is told to go away (GOAWAY, then close).
//!
//! A client can also open its window just often enough to beat that
//! deadline (one chunk per `write_timeout`). Each stream is therefore held
//! to `server.response_min_rate` too, over the time its next chunk waits
//! on the client (see [`crate::body::RateWindow`]); a slower one is reset
//! the same way.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};

use crate::body::{MinRate, RateWindow};

tokio::task_local! {
    /// The connection whose future is being polled (its streams are
    /// spawned from inside that poll).
    static CONNECTION: Arc<ConnStreams>;
    /// The stream whose task is being polled.
    static STREAM: Arc<StreamProgress>;
}

/// The streams of one client connection, and whether they all stalled.
#[derive(Debug)]
pub struct ConnStreams {
    limit: Duration,
    rate: MinRate,
    opened: Instant,
    /// Nanoseconds after `opened` of the latest progress of any stream.
    progressed: AtomicU64,
    all_stalled: Notify,
    stalled_responses: Counter,
    slow_responses: Counter,
}

impl ConnStreams {
    /// Streams of a connection opened now, each allowed `limit` without
    /// progress and held to `rate`; `stalled_responses` and
    /// `slow_responses` count the ones reset for each.
    pub fn new(
        limit: Duration,
        rate: MinRate,
        stalled_responses: Counter,
        slow_responses: Counter,
    ) -> Arc<Self> {
        Arc::new(Self {
            limit,
            rate,
            opened: Instant::now(),
            progressed: AtomicU64::new(0),
            all_stalled: Notify::new(),
            stalled_responses,
            slow_responses,
        })
    }

    /// Runs the connection future `conn`, so that the streams it spawns
    /// through [`StreamExecutor`] are watched.
    pub fn scope<F: Future>(self: &Arc<Self>, conn: F) -> TaskLocalFuture<Arc<Self>, F> {
        CONNECTION.scope(self.clone(), conn)
    }

    /// Completes when a stream stalled while no stream of the connection
    /// made progress within the deadline.
    pub async fn all_stalled(&self) {
        self.all_stalled.notified().await;
    }

    fn since_open(&self, now: Instant) -> u64 {
        u64::try_from((now - self.opened).as_nanos()).unwrap_or(u64::MAX)
    }

    fn progress(&self, now: Instant) {
        self.progressed.fetch_max(self.since_open(now), Ordering::Relaxed);
    }

    fn stalled(&self, now: Instant) {
        self.stalled_responses.inc();
        let quiet = self
            .since_open(now)
            .saturating_sub(self.progressed.load(Ordering::Relaxed));
        if Duration::from_nanos(quiet) >= self.limit {
            // Stored as a permit when nobody waits yet.
            self.all_stalled.notify_one();
        }
    }
}

/// What a response body reports to its stream's deadline.
#[derive(Debug, Default)]
struct StreamProgress {
    /// Times the body was asked for a chunk.
    polls: AtomicU64,
    /// The body is waiting on the upstream, not on the client.
    upstream_pending: AtomicBool,
    /// Bytes the body handed out.
    bytes: AtomicU64,
}

/// Called by a response body each time it is asked for a chunk; `pending`
/// when it has none yet (the upstream is the slow one).
pub fn body_polled(pending: bool) {
    let _ = STREAM.try_with(|s| {
        s.polls.fetch_add(1, Ordering::Relaxed);
        s.upstream_pending.store(pending, Ordering::Relaxed);
    });
}

/// Called by a response body for the `n` bytes of each chunk it hands out.
pub fn body_sent(n: usize) {
    let _ = STREAM.try_with(|s| s.bytes.fetch_add(n as u64, Ordering::Relaxed));
}

/// Whether the caller runs as a watched HTTP/2 stream.
pub fn watched() -> bool {
    STREAM.try_with(|_| ()).is_ok()
}

/// The executor of client connections: HTTP/2 streams spawned inside a
/// [`ConnStreams::scope`] get a progress deadline.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        match CONNECTION.try_with(Arc::clone) {
            Ok(conn) => {
                let progress = Arc::new(StreamProgress::default());
                crate::tasks::spawn(Watched {
                    inner: Some(STREAM.scope(progress.clone(), fut)),
                    timer: tokio::time::sleep(conn.limit),
                    rate_timer: tokio::time::sleep(Duration::ZERO),
                    progress,
                    conn,
                    seen: 0,
                    rated: Rated::default(),
                });
            }
            Err(_) => {
                crate::tasks::spawn(fut);
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A stream task with its progress deadline.
    struct Watched<F> {
        #[pin]
        inner: Option<TaskLocalFuture<Arc<StreamProgress>, F>>,
        #[pin]
        timer: Sleep,
        #[pin]
        rate_timer: Sleep,
        progress: Arc<StreamProgress>,
        conn: Arc<ConnStreams>,
        seen: u64,
        rated: Rated,
    }
}

/// A stream's response rate so far.
#[derive(Default)]
struct Rated {
    window: RateWindow,
    /// Polls and bytes of the body already counted.
    polls: u64,
    bytes: u64,
    /// Since when the body's latest chunk has waited on the client.
    waiting: Option<Instant>,
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(());
        };
        if inner.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let polls = this.progress.polls.load(Ordering::Relaxed);
        if polls == 0 {
            // No response yet: the upstream response timeout's business.
            return Poll::Pending;
        }
        let now = Instant::now();
        if polls != *this.seen || this.progress.upstream_pending.load(Ordering::Relaxed) {
            *this.seen = polls;
            this.timer.as_mut().reset(now + this.conn.limit);
            this.conn.progress(now);
        }
        if this.timer.as_mut().poll(cx).is_ready() {
            // Dropping the stream resets it and drops the upstream body.
            this.inner.set(None);
            this.conn.stalled(now);
            return Poll::Ready(());
        }
        if too_slow(
            this.rated,
            this.rate_timer.as_mut(),
            this.progress,
            this.conn.rate,
            polls,
            now,
            cx,
        ) {
            this.inner.set(None);
            this.conn.slow_responses.inc();
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Whether the stream fell below its response rate. The body was polled
/// `polls` times: when that moved, the chunk that waited on the client
/// went out; the one it handed now waits in turn, unless the body waits on
/// the upstream instead.
fn too_slow(
    r: &mut Rated,
    mut timer: Pin<&mut Sleep>,
    progress: &StreamProgress,
    rate: MinRate,
    polls: u64,
    now: Instant,
    cx: &mut Context<'_>,
) -> bool {
    if rate.min_rate == 0 {
        return false;
    }
    let bytes = progress.bytes.load(Ordering::Relaxed);
    r.window.moved(bytes.saturating_sub(r.bytes));
    r.bytes = bytes;
    let waited = if polls != r.polls {
        r.polls = polls;
        let since = r.waiting.take();
        if !progress.upstream_pending.load(Ordering::Relaxed) {
            r.waiting = Some(now);
        }
        since
    } else if r.waiting.is_some() && timer.as_mut().poll(cx).is_ready() {
        // Still waiting when its window closed: judge the window.
        r.waiting.replace(now)
    } else {
        return false;
    };
    if let Some(since) = waited
        && r.window.waited(rate, now - since)
    {
        return true;
    }
    if r.waiting.is_some()
        && let Some(left) = r.window.left(rate)
    {
        timer.as_mut().reset(now + left);
        let _ = timer.poll(cx);
    }
    false
}
