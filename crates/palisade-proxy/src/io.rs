//! Connection-level deadlines, enforced in the socket wrapper so they hold
//! for every protocol and cannot be forgotten by a code path:
//!
//! - **header deadline**: from the first byte of a request head to the
//!   request being dispatched, however the bytes trickle in (slowloris);
//! - **idle**: no request in flight and nothing received;
//! - **write**: a write that makes no progress;
//! - **response rate**: writes that progress, but slower on average than
//!   `server.response_min_rate` over the time spent waiting on the client
//!   (a client reading a byte a second never lets a write stall).
//!
//! hyper's own `header_read_timeout` also runs while a keep-alive connection
//! waits for its next request, which would cap idle time at the header
//! deadline; hence this wrapper.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::body::{MinRate, RateWindow};

/// Requests in flight on one connection, shared with its service.
#[derive(Debug, Default)]
pub struct ConnActivity {
    in_flight: AtomicUsize,
    started: AtomicU64,
    expired: AtomicU8,
    /// The reader parked while a request was in flight: it must wake up when
    /// the last one ends, to start the idle deadline.
    reader: Mutex<Option<Waker>>,
}

impl ConnActivity {
    /// A request head was dispatched; it is in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// No request is in flight (the connection waits for one, or reads its
    /// head).
    pub fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Which deadline closed the connection, if one did.
    pub fn expired(&self) -> Option<Expired> {
        match self.expired.load(Ordering::Acquire) {
            1 => Some(Expired::Header),
            2 => Some(Expired::Idle),
            3 => Some(Expired::Write),
            4 => Some(Expired::SlowRead),
            _ => None,
        }
    }

    fn set_expired(&self, what: Expired) {
        let v = match what {
            Expired::Header => 1,
            Expired::Idle => 2,
            Expired::Write => 3,
            Expired::SlowRead => 4,
        };
        self.expired.store(v, Ordering::Release);
    }
}

/// Marks a request in flight until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<ConnActivity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let waker = self.0.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

/// Which deadline closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Request head not complete in time.
    Header,
    /// Idle keep-alive connection.
    Idle,
    /// Write stalled.
    Write,
    /// The client read below the response rate.
    SlowRead,
}

impl Expired {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Idle => "idle",
            Self::Write => "write",
            Self::SlowRead => "slow_read",
        }
    }
}

/// Deadlines for [`TimedIo`].
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// Whole request head.
    pub header: Duration,
    /// Keep-alive idle.
    pub idle: Duration,
    /// Write progress.
    pub write: Duration,
    /// Slowest the client may take what is written, over the time it is
    /// waited on.
    pub response_rate: MinRate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a request.
    Idle,
    /// Bytes of a head arrived; `seen` is the request count at that point.
    Head { seen: u64 },
    /// A request is in flight.
    Busy,
}

pin_project_lite::pin_project! {
    /// A socket with header, idle and write deadlines.
    pub struct TimedIo<T> {
        #[pin]
        inner: T,
        activity: Arc<ConnActivity>,
        deadlines: Deadlines,
        phase: Phase,
        http2: Option<bool>,
        read_timer: Pin<Box<Sleep>>,
        write_timer: Pin<Box<Sleep>>,
        write_armed: bool,
        rate: RateWindow,
        // Since when a write has waited on the client.
        blocked_since: Option<Instant>,
        rate_timer: Pin<Box<Sleep>>,
    }
}

impl<T> TimedIo<T> {
    /// The socket, deadlines dropped (an upgraded connection is a tunnel).
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// Wraps `inner`; the idle deadline starts now.
    pub fn new(inner: T, activity: Arc<ConnActivity>, deadlines: Deadlines) -> Self {
        let now = Instant::now();
        Self {
            inner,
            activity,
            deadlines,
            phase: Phase::Idle,
            http2: None,
            // The first request must start within the header deadline.
            read_timer: Box::pin(tokio::time::sleep_until(now + deadlines.header)),
            write_timer: Box::pin(tokio::time::sleep_until(now + deadlines.write)),
            write_armed: false,
            rate: RateWindow::default(),
            blocked_since: None,
            rate_timer: Box::pin(tokio::time::sleep_until(now)),
        }
    }
}

fn timed_out(what: Expired) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{} timeout", what.as_str()))
}

impl<T: AsyncRead> AsyncRead for TimedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let now = Instant::now();
        let started = this.activity.started.load(Ordering::Acquire);
        if this.activity.in_flight.load(Ordering::Acquire) > 0 {
            *this.phase = Phase::Busy;
            let mut reader = this.activity.reader.lock().unwrap_or_else(|p| p.into_inner());
            if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *reader = Some(cx.waker().clone());
            }
            drop(reader);
            // The last request may have ended in between: look again.
            if this.activity.in_flight.load(Ordering::Acquire) == 0 {
                cx.waker().wake_by_ref();
            }
        } else {
            let head_done = matches!(*this.phase, Phase::Head { seen } if seen != started);
            if *this.phase == Phase::Busy || head_done {
                *this.phase = Phase::Idle;
                this.read_timer.as_mut().reset(now + this.deadlines.idle);
            }
        }
        if *this.phase != Phase::Busy && this.read_timer.as_mut().poll(cx).is_ready() {
            let what = match *this.phase {
                Phase::Head { .. } => Expired::Header,
                _ if this.http2.is_none() => Expired::Header,
                _ => Expired::Idle,
            };
            this.activity.set_expired(what);
            return match what {
                // An idle close is a clean end of stream, not an error.
                Expired::Idle => Poll::Ready(Ok(())),
                _ => Poll::Ready(Err(timed_out(what))),
            };
        }
        let before = buf.filled().len();
        ready!(this.inner.poll_read(cx, buf))?;
        let got = &buf.filled()[before..];
        if !got.is_empty() {
            if this.http2.is_none() {
                *this.http2 = Some(got.starts_with(b"PRI * HTTP/2"));
            }
            // HTTP/2 frames between requests (pings, window updates) are
            // not request heads; its streams are bounded by h2's own limits.
            if *this.phase == Phase::Idle && *this.http2 != Some(true) {
                *this.phase = Phase::Head { seen: started };
                this.read_timer.as_mut().reset(now + this.deadlines.header);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite> TimedIo<T> {
    /// `op` is one write (or flush); `moved` says how many bytes a
    /// completed one took.
    fn poll_write_with<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<R>>,
        moved: impl FnOnce(&R) -> usize,
    ) -> Poll<io::Result<R>> {
        let this = self.project();
        let rate = this.deadlines.response_rate;
        match op(this.inner, cx) {
            Poll::Ready(r) => {
                *this.write_armed = false;
                if let Ok(done) = &r {
                    this.rate.moved(moved(done) as u64);
                }
                if let Some(since) = this.blocked_since.take()
                    && this.rate.waited(rate, since.elapsed())
                {
                    this.activity.set_expired(Expired::SlowRead);
                    return Poll::Ready(Err(timed_out(Expired::SlowRead)));
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let now = Instant::now();
                if !*this.write_armed {
                    *this.write_armed = true;
                    this.write_timer.as_mut().reset(now + this.deadlines.write);
                }
                if this.write_timer.as_mut().poll(cx).is_ready() {
                    this.activity.set_expired(Expired::Write);
                    return Poll::Ready(Err(timed_out(Expired::Write)));
                }
                let Some(left) = this.rate.left(rate) else {
                    return Poll::Pending;
                };
                match *this.blocked_since {
                    None => {
                        *this.blocked_since = Some(now);
                        this.rate_timer.as_mut().reset(now + left);
                    }
                    // The window closed while still waiting: judge it, and
                    // the next one starts.
                    Some(since) if this.rate_timer.as_mut().poll(cx).is_ready() => {
                        *this.blocked_since = Some(now);
                        if this.rate.waited(rate, now - since) {
                            this.activity.set_expired(Expired::SlowRead);
                            return Poll::Ready(Err(timed_out(Expired::SlowRead)));
                        }
                        let left = this.rate.left(rate).unwrap_or(left);
                        this.rate_timer.as_mut().reset(now + left);
                    }
                    Some(_) => return Poll::Pending,
                }
                // Registers the waker for the deadline just set.
                let _ = this.rate_timer.as_mut().poll(cx);
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for TimedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |io, cx| io.poll_write(cx, buf), |n| *n)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |io, cx| io.poll_write_vectored(cx, bufs), |n| *n)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_with(cx, |io, cx| io.poll_flush(cx), |()| 0)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_with(cx, |io, cx| io.poll_shutdown(cx), |()| 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const D: Deadlines = Deadlines {
        header: Duration::from_secs(5),
        idle: Duration::from_secs(30),
        write: Duration::from_secs(10),
        response_rate: MinRate {
            min_rate: 0,
            grace: Duration::from_secs(10),
        },
    };

    #[tokio::test(start_paused = true)]
    async fn trickled_head_hits_the_whole_header_deadline() {
        let (client, server) = tokio::io::duplex(1024);
        let activity = Arc::new(ConnActivity::default());
        let mut io = TimedIo::new(server, activity.clone(), D);
        let mut client = client;
        let start = Instant::now();
        let drip = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nX: yyyyyyyyyyyyyyy" {
                client.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            client
        });
        let mut buf = [0u8; 64];
        let err = loop {
            match io.read(&mut buf).await {
                Ok(0) => panic!("unexpected eof"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(activity.expired(), Some(Expired::Header));
        // Each byte came within 500 ms; only the whole-head deadline fires.
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
        drip.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keepalive_lasts_idle_timeout_then_ends_cleanly() {
        let (mut client, server) = tokio::io::duplex(1024);
        let activity = Arc::new(ConnActivity::default());
        let mut io = TimedIo::new(server, activity.clone(), D);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.unwrap() > 0);
        // The request is dispatched and answered.
        drop(activity.begin());
        let start = Instant::now();
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        assert_eq!(Instant::now() - start, D.idle);
        assert_eq!(activity.expired(), Some(Expired::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_request_has_no_read_deadline() {
        let (mut client, server) = tokio::io::duplex(1024);
        let activity = Arc::new(ConnActivity::default());
        let mut io = TimedIo::new(server, activity.clone(), D);
        client.write_all(b"POST / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.unwrap() > 0);
        let guard = activity.begin();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            client.write_all(b"body").await.unwrap();
            client
        });
        assert_eq!(io.read(&mut buf).await.unwrap(), 4);
        assert_eq!(activity.expired(), None);
        drop(guard);
        drop(writer);
    }

    /// A reader taking 16 bytes every `every`, for as long as it is fed.
    fn drip_reader(mut client: tokio::io::DuplexStream, every: Duration) -> tokio::task::JoinHandle<usize> {
        tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut got = 0;
            while let Ok(n @ 1..) = client.read(&mut buf).await {
                got += n;
                tokio::time::sleep(every).await;
            }
            got
        })
    }

    const RATED: Deadlines = Deadlines {
        response_rate: MinRate {
            min_rate: 100,
            grace: Duration::from_secs(5),
        },
        ..D
    };

    #[tokio::test(start_paused = true)]
    async fn a_reader_below_the_response_rate_is_cut_though_every_write_progresses() {
        let (client, server) = tokio::io::duplex(16);
        let activity = Arc::new(ConnActivity::default());
        let mut io = TimedIo::new(server, activity.clone(), RATED);
        // 32 bytes/s: each write waits 500 ms, far within the write deadline.
        let reader = drip_reader(client, Duration::from_millis(500));
        let start = Instant::now();
        let err = io.write_all(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(activity.expired(), Some(Expired::SlowRead));
        // Judged when the first 5 s window of waiting closed.
        let took = Instant::now() - start;
        assert!(
            took >= RATED.response_rate.grace && took < 2 * RATED.response_rate.grace,
            "{took:?}"
        );
        drop(io);
        assert!(reader.await.unwrap() < 4096);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_at_the_response_rate_gets_everything() {
        let (client, server) = tokio::io::duplex(16);
        let activity = Arc::new(ConnActivity::default());
        let mut io = TimedIo::new(server, activity.clone(), RATED);
        // 160 bytes/s, over the 100 asked.
        let reader = drip_reader(client, Duration::from_millis(100));
        io.write_all(&[0u8; 4096]).await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), 4096);
        assert_eq!(activity.expired(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_write_times_out() {
        let (_client, server) = tokio::io::duplex(16);
        let activity = Arc::new(ConnActivity::default());
        let mut io = TimedIo::new(server, activity.clone(), D);
        let start = Instant::now();
        let err = io.write_all(&[0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(Instant::now() - start, D.write);
        assert_eq!(activity.expired(), Some(Expired::Write));
    }
}
