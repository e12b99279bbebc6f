//! The request path: decide, then answer or forward.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use palisade_core::{MonotonicClock, NANOS_PER_SEC};
use palisade_limits::shield::{Decision, RequestFacts, Shield};

use crate::body::{BodyLimits, TimedBody};
use crate::config::Config;
use crate::forward::{append_forwarded, strip_hop_by_hop};
use crate::io::{ConnActivity, InFlight};
use crate::metrics::{self, LatencyLabels, Metrics, RequestLabels, intern};
use crate::respond::{self, UpstreamFailure};

/// Body sent upstream: the client's body with deadlines, or nothing.
pub type UpstreamBody = Either<TimedBody<Incoming>, Empty<Bytes>>;

/// State shared by every connection.
pub struct App {
    /// The protection pipeline.
    pub shield: Shield<MonotonicClock>,
    /// Exported metrics.
    pub metrics: Metrics,
    /// The config in force.
    pub config: Config,
    /// False while draining, for `/readyz`.
    pub ready: AtomicBool,
    client: Client<HttpConnector, UpstreamBody>,
    upstreams: Vec<Authority>,
    next_upstream: AtomicUsize,
    route_labels: Vec<&'static str>,
    body_limits: BodyLimits,
    log_budget: LogBudget,
}

impl App {
    /// Builds the shared state from a validated config.
    pub fn new(config: Config) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.upstream.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.upstream.pool_idle_timeout)
            .pool_max_idle_per_host(config.upstream.pool_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let shield = Shield::new(config.shield.clone(), MonotonicClock::new());
        let route_labels = (0..shield.route_count())
            .map(|i| intern(shield.route_name(i)))
            .collect();
        Self {
            upstreams: config
                .server
                .upstreams
                .iter()
                .filter_map(|u| u.authority().cloned())
                .collect(),
            next_upstream: AtomicUsize::new(0),
            body_limits: BodyLimits {
                gap: config.server.body_read_timeout,
                min_rate: config.server.body_min_rate,
                grace: config.server.body_rate_grace,
            },
            route_labels,
            client,
            shield,
            metrics: Metrics::new(),
            ready: AtomicBool::new(true),
            log_budget: LogBudget::default(),
            config,
        }
    }

    /// Refreshes the gauges that are computed from tables rather than counted.
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        let now = self.shield.now();
        for (name, limiter) in self.shield.limiters() {
            let label = metrics::TableLabel {
                table: format!("limiter:{name}"),
            };
            let t = limiter.table();
            m.tracked_clients.get_or_create(&label).set(t.len() as i64);
            let c = m.table_overflows.get_or_create(&label);
            c.inc_by(t.overflowed().saturating_sub(c.get()));
        }
        if let Some(rep) = self.shield.reputation() {
            let label = metrics::TableLabel {
                table: "reputation".into(),
            };
            m.tracked_clients
                .get_or_create(&label)
                .set(rep.table().len() as i64);
            let c = m.table_overflows.get_or_create(&label);
            c.inc_by(rep.table().overflowed().saturating_sub(c.get()));
            for (bucket, n) in metrics::SCORE_BUCKETS.iter().zip(rep.distribution(now)) {
                m.reputation_scores
                    .get_or_create(&metrics::ScoreLabel { bucket })
                    .set(n as i64);
            }
        }
    }

    fn pick_upstream(&self) -> &Authority {
        let i = self.next_upstream.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        &self.upstreams[i]
    }

    /// Decides and answers one request.
    pub async fn handle(self: Arc<Self>, peer: SocketAddr, req: Request<Incoming>) -> Response<ResponseBody> {
        let start = self.shield.now();
        let method = metrics::method_label(req.method());
        let decision = {
            let host = req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(Authority::as_str));
            self.shield.decide(&RequestFacts {
                peer: peer.ip(),
                method: req.method(),
                host,
                path: req.uri().path(),
                headers: req.headers(),
            })
        };
        let endpoint = self
            .route_labels
            .get(decision.route)
            .copied()
            .unwrap_or("default");
        if decision.flooded {
            Metrics::inc(&self.metrics.penalties, "flood");
            if self.log_budget.take(start) {
                tracing::warn!(client = %decision.client_ip, "flood: more than the per-second threshold; reputation penalised");
            }
        }
        if let Some(reason) = decision.would_block {
            Metrics::inc(&self.metrics.would_block, reason.as_str());
            if self.log_budget.take(start) {
                tracing::info!(client = %decision.client_ip, %reason, endpoint, "would_block (shadow mode)");
            }
        }
        self.metrics.decision(decision.rejection.map(|r| r.reason));
        let response = match &decision.rejection {
            Some(rej) => {
                if self.log_budget.take(start) {
                    tracing::info!(client = %decision.client_ip, reason = %rej.reason, endpoint, "refused");
                }
                respond::rejection(rej, endpoint).map(Either::Right)
            }
            None => {
                let r = self.forward(peer, &decision, req).await;
                if self.shield.observe_response(&decision, r.status().as_u16()) {
                    Metrics::inc(&self.metrics.penalties, "error_streak");
                }
                r
            }
        };
        let status = response.status().as_u16();
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                endpoint,
                method,
                status,
            })
            .inc();
        let elapsed = self.shield.now().saturating_sub(start) as f64 / NANOS_PER_SEC as f64;
        self.metrics
            .latency
            .get_or_create(&LatencyLabels { endpoint, method })
            .observe(elapsed);
        response.map(|b| ResponseBody {
            inner: b,
            guard: None,
        })
    }

    async fn forward(
        &self,
        peer: SocketAddr,
        decision: &Decision,
        req: Request<Incoming>,
    ) -> Response<Either<Incoming, Full<Bytes>>> {
        let (mut parts, body) = req.into_parts();
        // HTTP/2 clients send :authority instead of Host; HTTP/1.1 upstreams need Host.
        if !parts.headers.contains_key(HOST)
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(HOST, v);
        }
        strip_hop_by_hop(&mut parts.headers);
        let host = parts
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned);
        append_forwarded(&mut parts.headers, peer.ip().to_canonical(), host.as_deref());
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.pick_upstream().clone());
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or(PathAndQuery::from_static("/")),
        );
        parts.uri = match Uri::from_parts(uri) {
            Ok(u) => u,
            Err(_) => return respond::upstream_failure(UpstreamFailure::Other).map(Either::Right),
        };
        parts.version = Version::HTTP_11;
        let slow = Arc::new(AtomicBool::new(false));
        let body = if body.is_end_stream() {
            Either::Right(Empty::new())
        } else {
            Either::Left(TimedBody::new(body, self.body_limits, slow.clone()))
        };
        let sent = self.client.request(Request::from_parts(parts, body));
        let failure = match tokio::time::timeout(self.config.upstream.response_timeout, sent).await {
            Ok(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut());
                return resp.map(Either::Left);
            }
            Err(_) => UpstreamFailure::Timeout,
            Ok(Err(_)) if slow.load(Ordering::Acquire) => UpstreamFailure::SlowBody,
            Ok(Err(e)) if e.is_connect() => UpstreamFailure::Connect,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upstream request failed");
                UpstreamFailure::Other
            }
        };
        Metrics::inc(&self.metrics.upstream_errors, failure.as_str());
        if failure != UpstreamFailure::SlowBody && self.log_budget.take(self.shield.now()) {
            tracing::warn!(client = %decision.client_ip, failure = failure.as_str(), "upstream failed");
        }
        respond::upstream_failure(failure).map(Either::Right)
    }
}

/// The response body, keeping its request "in flight" until fully sent so
/// the connection's idle deadline does not run during a long download.
pub struct ResponseBody {
    inner: Either<Incoming, Full<Bytes>>,
    guard: Option<InFlight>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Either::Left(b) => Pin::new(b).poll_frame(cx),
            Either::Right(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        };
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The hyper service of one client connection.
#[derive(Clone)]
pub struct ProxyService {
    /// Shared state.
    pub app: Arc<App>,
    /// TCP peer.
    pub peer: SocketAddr,
    /// Requests in flight on this connection.
    pub activity: Arc<ConnActivity>,
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        let app = self.app.clone();
        let peer = self.peer;
        Box::pin(async move {
            let mut resp = app.handle(peer, req).await;
            resp.body_mut().guard = Some(guard);
            Ok(resp)
        })
    }
}

/// At most a few log lines per second for per-request events, so an attack
/// cannot turn logging into its amplifier. Counters carry the full story.
#[derive(Default)]
pub struct LogBudget {
    /// `(second << 32) | lines`.
    state: AtomicU64,
}

impl LogBudget {
    const PER_SECOND: u64 = 20;

    /// Whether a line may be written at `now` (clock nanos).
    pub fn take(&self, now: u64) -> bool {
        let second = now / NANOS_PER_SEC;
        let prev = self.state.load(Ordering::Relaxed);
        if prev >> 32 != second {
            self.state.store((second << 32) | 1, Ordering::Relaxed);
            return true;
        }
        (self.state.fetch_add(1, Ordering::Relaxed) & u64::from(u32::MAX)) < Self::PER_SECOND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_budget_caps_lines_per_second() {
        let b = LogBudget::default();
        let granted = (0..1000).filter(|_| b.take(5 * NANOS_PER_SEC)).count();
        assert_eq!(granted as u64, LogBudget::PER_SECOND);
        assert!(b.take(6 * NANOS_PER_SEC));
    }
}
