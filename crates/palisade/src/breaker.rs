//! The classic circuit breaker (closed → open → half-open, gobreaker's
//! semantics) as a tower layer around a whole service: when the service
//! keeps failing, requests are answered 503 without calling it.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use palisade_core::{Clock, MonotonicClock, NANOS_PER_SEC, RejectReason};
use palisade_limits::breaker::{Attempt, Breaker, BreakerConfig, Outcome, Transition};
use palisade_limits::shield::Rejection;
use tower_layer::Layer;
use tower_service::Service;

use crate::shield::{Answer, Early, Finish, Reply, Respond};

/// The statuses that count as failures, 100–599.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    /// No status.
    pub const fn empty() -> Self {
        Self([0; 10])
    }

    /// 500–599, the default.
    pub fn server_errors() -> Self {
        let mut s = Self::empty();
        s.insert_range(500, 599);
        s
    }

    /// Parses entries such as `"5xx"` (a class) or `"429"` (one status);
    /// an error names the index of the entry that is neither.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, (usize, String)> {
        let mut s = Self::empty();
        for (i, entry) in entries.iter().enumerate() {
            let entry = entry.as_ref();
            match entry.as_bytes() {
                [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                    let base = u16::from(c - b'0') * 100;
                    s.insert_range(base, base + 99);
                }
                _ => match entry.parse::<u16>() {
                    Ok(code @ 100..=599) => s.insert_range(code, code),
                    _ => {
                        return Err((
                            i,
                            format!("{entry:?} is not a status (e.g. 503) or class (e.g. \"5xx\")"),
                        ));
                    }
                },
            }
        }
        Ok(s)
    }

    fn insert_range(&mut self, from: u16, to: u16) {
        for code in from..=to {
            self.0[usize::from(code / 64)] |= 1 << (code % 64);
        }
    }

    /// Whether `status` is in the set.
    pub fn contains(&self, status: u16) -> bool {
        self.0
            .get(usize::from(status / 64))
            .is_some_and(|w| w & (1 << (status % 64)) != 0)
    }
}

impl Default for StatusSet {
    fn default() -> Self {
        Self::server_errors()
    }
}

/// A breaker's rules and what counts as a failed response.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BreakerSettings {
    /// When to open and for how long.
    pub rules: BreakerConfig,
    /// Responses that count as failures (errors of the service always do).
    pub failure_statuses: StatusSet,
}

/// The classic breaker as a tower [`Layer`]. Clones share one breaker.
pub struct BreakerLayer<C = MonotonicClock, M = Respond> {
    /// `None`: passes everything through (`[breaker] enabled = false`).
    breaker: Option<Arc<Breaker>>,
    failures: StatusSet,
    clock: C,
    reply: PhantomData<fn() -> M>,
}

impl<C: Clone, M> Clone for BreakerLayer<C, M> {
    fn clone(&self) -> Self {
        Self {
            breaker: self.breaker.clone(),
            failures: self.failures,
            clock: self.clock.clone(),
            reply: PhantomData,
        }
    }
}

impl BreakerLayer {
    /// A closed breaker with these rules, on the monotonic clock.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response, StatusCode};
    /// use palisade::{BreakerLayer, BreakerSettings};
    /// use tower::{Layer, ServiceExt, service_fn};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let failing = service_fn(|_req: Request<String>| async {
    ///     let mut res = Response::new(String::new());
    ///     *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    ///     Ok::<_, Infallible>(res)
    /// });
    /// let svc = BreakerLayer::new(BreakerSettings::default()).layer(failing);
    /// let mut statuses = Vec::new();
    /// for _ in 0..20 {
    ///     statuses.push(svc.clone().oneshot(Request::new(String::new())).await.unwrap().status());
    /// }
    /// // After enough failures the breaker answers 503 itself, without calling the service.
    /// assert_eq!(statuses.last(), Some(&StatusCode::SERVICE_UNAVAILABLE));
    /// # });
    /// ```
    pub fn new(settings: BreakerSettings) -> Self {
        Self::with_clock(settings, MonotonicClock::new())
    }
}

impl<C: Clock + Clone> BreakerLayer<C> {
    /// A closed breaker on your clock (tests drive time by hand).
    pub fn with_clock(settings: BreakerSettings, clock: C) -> Self {
        Self {
            breaker: Some(Arc::new(Breaker::new(settings.rules, clock.now()))),
            failures: settings.failure_statuses,
            clock,
            reply: PhantomData,
        }
    }

    /// A layer that passes every request through.
    pub(crate) fn off(clock: C) -> Self {
        Self {
            breaker: None,
            failures: StatusSet::empty(),
            clock,
            reply: PhantomData,
        }
    }
}

impl<C, M> BreakerLayer<C, M> {
    /// Refusals become errors ([`Refused`](crate::Refused)) instead of 503s.
    pub fn errors(self) -> BreakerLayer<C, crate::Fail> {
        BreakerLayer {
            breaker: self.breaker,
            failures: self.failures,
            clock: self.clock,
            reply: PhantomData,
        }
    }

    /// The breaker (state, counts); `None` when it is off.
    pub fn breaker(&self) -> Option<&Arc<Breaker>> {
        self.breaker.as_ref()
    }
}

impl<S, C: Clock + Clone, M> Layer<S> for BreakerLayer<C, M> {
    type Service = BreakerService<S, C, M>;

    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service a [`BreakerLayer`] makes.
pub struct BreakerService<S, C = MonotonicClock, M = Respond> {
    inner: S,
    layer: BreakerLayer<C, M>,
}

impl<S: Clone, C: Clone, M> Clone for BreakerService<S, C, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

fn log(t: Option<Transition>) {
    if let Some(t) = t {
        // Transitions are rare by construction: always logged.
        tracing::warn!(
            from = t.from.as_str(),
            to = t.to.as_str(),
            requests = t.counts.requests,
            failures = t.counts.failures,
            "circuit breaker"
        );
    }
}

impl<S, C, M, ReqB, ResB> Service<Request<ReqB>> for BreakerService<S, C, M>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    C: Clock + Clone,
    M: Reply<ResB, S::Error>,
{
    type Response = M::Response;
    type Error = M::Error;
    type Future = BreakerFuture<S::Future, C, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(M::error)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let failures = self.layer.failures;
        let Some(breaker) = &self.layer.breaker else {
            return BreakerFuture::new(Answer::called(self.inner.call(req), None));
        };
        let (admitted, transition) = Attempt::begin(breaker, self.layer.clock.clone());
        log(transition);
        let state = match admitted {
            Ok(attempt) => Answer::called(self.inner.call(req), Some(Settle { attempt, failures })),
            Err(refused) => {
                let rejection = Rejection {
                    reason: RejectReason::BreakerOpen,
                    retry_after_secs: Some(refused.retry_after.div_ceil(NANOS_PER_SEC).max(1)),
                    quota: None,
                };
                Answer::early(Early::refused_locally(rejection, "breaker"))
            }
        };
        BreakerFuture::new(state)
    }
}

/// An admitted call's attempt, settled by the response's status.
struct Settle<C: Clock> {
    attempt: Attempt<C>,
    failures: StatusSet,
}

impl<C: Clock, B, E> Finish<B, E> for Settle<C> {
    fn finish(self, result: &mut Result<Response<B>, E>) {
        let outcome = match &*result {
            Ok(r) if !self.failures.contains(r.status().as_u16()) => Outcome::Success,
            _ => Outcome::Failure,
        };
        log(self.attempt.finish(outcome));
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`BreakerService`] call.
    pub struct BreakerFuture<F, C: Clock, M> {
        #[pin]
        state: Answer<F, Settle<C>>,
        reply: PhantomData<fn() -> M>,
    }
}

impl<F, C: Clock, M> BreakerFuture<F, C, M> {
    fn new(state: Answer<F, Settle<C>>) -> Self {
        Self {
            state,
            reply: PhantomData,
        }
    }
}

impl<F, C, M, B, E> Future for BreakerFuture<F, C, M>
where
    F: Future<Output = Result<Response<B>, E>>,
    C: Clock,
    M: Reply<B, E>,
{
    type Output = Result<M::Response, M::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().state.poll_reply::<M, B, E>(cx, "BreakerFuture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_sets_parse_classes_and_codes() {
        let s = StatusSet::parse(&["5xx", "429"]).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(s.contains(500) && s.contains(599) && s.contains(429));
        assert!(!s.contains(499) && !s.contains(404) && !s.contains(600) && !s.contains(u16::MAX));
        assert_eq!(StatusSet::parse(&["5xx", "60x"]).map_err(|e| e.0), Err(1));
        assert_eq!(StatusSet::parse(&["99"]).map_err(|e| e.0), Err(0));
        assert_eq!(
            StatusSet::default(),
            StatusSet::parse(&["5XX"]).unwrap_or_else(|e| panic!("{e:?}"))
        );
    }
}
