//! Request body bounds: a bounded pause between chunks and a minimum
//! average rate, so a client cannot hold an upstream connection open by
//! sending a body one byte at a time, and a largest size, so it cannot
//! stream an endless one to the upstream. Bodies still stream: nothing is
//! buffered here.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// A minimum average transfer rate, for request bodies
/// (`server.body_min_rate`) and for responses (`server.response_min_rate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRate {
    /// Bytes/s (0 = off).
    pub min_rate: u64,
    /// How long before the rate counts.
    pub grace: Duration,
}

impl MinRate {
    /// Whether `bytes` in `elapsed` fall short of the rate, once `grace`
    /// has passed.
    pub fn short(&self, bytes: u64, elapsed: Duration) -> bool {
        self.min_rate > 0
            && elapsed >= self.grace
            && (bytes as f64) < self.min_rate as f64 * elapsed.as_secs_f64()
    }
}

/// A [`MinRate`] over consecutive windows of `grace` each: every window
/// must carry its share, so bytes moved fast early on buy no slack for
/// later. Only time in which the peer is the one awaited is counted (the
/// caller says which), so a response the upstream streams slowly is not
/// the client's fault.
#[derive(Debug, Default)]
pub struct RateWindow {
    bytes: u64,
    counted: Duration,
}

impl RateWindow {
    /// `n` more bytes moved.
    pub fn moved(&mut self, n: u64) {
        self.bytes = self.bytes.saturating_add(n);
    }

    /// `waited` more time spent waiting on the peer; whether the window
    /// that closed, if one did, fell short (the next one then starts).
    pub fn waited(&mut self, rate: MinRate, waited: Duration) -> bool {
        self.counted += waited;
        if rate.min_rate == 0 || self.counted < rate.grace {
            return false;
        }
        let short = rate.short(self.bytes, self.counted);
        *self = Self::default();
        short
    }

    /// Waiting left until the window closes; `None` when the rate is off.
    pub fn left(&self, rate: MinRate) -> Option<Duration> {
        (rate.min_rate > 0).then(|| rate.grace.saturating_sub(self.counted))
    }
}

/// Limits for [`TimedBody`].
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Longest pause between chunks.
    pub gap: Duration,
    /// Minimum average rate since the body started.
    pub rate: MinRate,
    /// Most bytes (0 = no limit).
    pub max_size: u64,
}

/// Why a body was cut off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client paused too long or sent too slowly.
    #[error("request body too slow")]
    TooSlow,
    /// The body grew past `max_size`.
    #[error("request body too large")]
    TooLarge,
    /// The client's connection failed.
    #[error("request body: {0}")]
    Client(#[from] hyper::Error),
}

/// Why a body was cut off, if it was: read by the forwarder once the
/// upstream request failed, so the answer can say 408 or 413 (the error
/// itself reaches it wrapped in hyper's, if at all).
#[derive(Debug, Default)]
pub struct CutReason(AtomicU8);

impl CutReason {
    /// The bound the body broke, if any.
    pub fn get(&self) -> Option<Cut> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(Cut::TooSlow),
            2 => Some(Cut::TooLarge),
            _ => None,
        }
    }

    fn set(&self, cut: Cut) {
        self.0.store(cut as u8, Ordering::Release);
    }
}

/// A bound a request body broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cut {
    /// Too slow (408).
    TooSlow = 1,
    /// Too large (413).
    TooLarge = 2,
}

/// A request body with read deadlines.
pub struct TimedBody<B> {
    inner: B,
    limits: BodyLimits,
    started: Instant,
    received: u64,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    cut: Arc<CutReason>,
    /// A header only Palisade may write (`server.tls_fingerprint_header`),
    /// removed from the trailers too: an HTTP/2 upstream reads a trailer
    /// like a header.
    owned: Option<http::HeaderName>,
}

impl<B> TimedBody<B> {
    /// Wraps `inner`; the clock starts now.
    pub fn new(inner: B, limits: BodyLimits, cut: Arc<CutReason>) -> Self {
        Self {
            inner,
            limits,
            started: Instant::now(),
            received: 0,
            timer: None,
            armed: false,
            cut,
            owned: None,
        }
    }

    /// Removes `name` from the trailers the client sends, beside what
    /// [`strip_trailers`](crate::forward::strip_trailers) always removes.
    pub fn without_trailer(mut self, name: Option<http::HeaderName>) -> Self {
        self.owned = name;
        self
    }

    fn too_slow(&mut self) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.cut.set(Cut::TooSlow);
        Poll::Ready(Some(Err(BodyError::TooSlow)))
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    crate::forward::strip_trailers(trailers, this.owned.as_ref());
                }
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    // The chunk that crosses the limit is not passed on:
                    // the upstream never gets more than `max_size`.
                    if this.limits.max_size > 0 && this.received > this.limits.max_size {
                        this.cut.set(Cut::TooLarge);
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                }
                if this.limits.rate.short(this.received, this.started.elapsed()) {
                    return this.too_slow();
                }
                this.armed = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = Instant::now() + this.limits.gap;
                let timer = match &mut this.timer {
                    Some(t) if this.armed => t,
                    Some(t) => {
                        t.as_mut().reset(deadline);
                        t
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.armed = true;
                if timer.as_mut().poll(cx).is_ready() {
                    return this.too_slow();
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
