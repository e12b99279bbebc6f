//! The request-side protection as a tower layer: allow and deny lists, the
//! reputation store, learned reputation, per-client rate limits and the
//! adaptive per-client breaker, decided by one [`Shield`] per request.

use std::future::Future;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::HOST;
use http::{Extensions, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use palisade_core::{
    Clock, HostError, MonotonicClock, PathError, RejectReason, normalize_host, normalize_path, route_path,
};
use palisade_limits::adaptive::AdaptiveConfig;
use palisade_limits::rate::Quota;
use palisade_limits::reputation::ReputationConfig;
use palisade_limits::shield::{
    Decision, LimitPolicy, Rejection, RequestFacts, ResponseEffects, Shield, ShieldConfig,
};
use tower_layer::Layer;
use tower_service::Service;

use crate::respond;

/// Where a [`ShieldService`] finds the [`Shield`] in force for a request,
/// and what it tells about each one.
///
/// `Arc<Shield<C>>` is the plain pipeline (no hooks). The `palisade`
/// daemon supplies its own: it swaps the shield on reload, adds its
/// cluster-wide limits and kernel bans in [`begin`](Self::begin), and counts
/// metrics in [`end`](Self::end).
pub trait Pipeline: Clone + Send + Sync + 'static {
    /// The clock decisions are made with.
    type Clock: Clock;
    /// What one request holds on to from decision to response (the config
    /// in force when it arrived).
    type Snapshot: Send + Sync + 'static;
    /// What [`begin`](Self::begin) hands to [`end`](Self::end).
    type Tag: Send + 'static;

    /// The snapshot for a new request.
    fn load(&self) -> Self::Snapshot;
    /// The shield inside a snapshot.
    fn shield<'a>(&self, snapshot: &'a Self::Snapshot) -> &'a Shield<Self::Clock>;
    /// Whether an outside ban list (the daemon's kernel bans) refuses the
    /// resolved client. Asked right after the allow list, before any limit
    /// or score is charged, so a banned client costs nothing but the lookup.
    fn banned(&self, _snapshot: &Self::Snapshot, _client: IpAddr) -> bool {
        false
    }
    /// Runs after the shield decided and before the answer; may refuse
    /// with further checks of its own (through [`Decision::apply`]).
    fn begin(&self, snapshot: &Self::Snapshot, req: &RequestFacts<'_>, decision: &mut Decision) -> Self::Tag;
    /// Asked after [`begin`](Self::begin) for an admitted request: an
    /// answer of the pipeline's own (the daemon's challenge page), which
    /// the request gets instead of the inner service's. Like a refusal, it
    /// feeds nothing back to the client's score or breaker.
    fn answer(&self, _tag: &mut Self::Tag) -> Option<Response<Full<Bytes>>> {
        None
    }
    /// Runs exactly once per request: refused, served, or abandoned by
    /// the client before the answer (status [`CLIENT_CLOSED_REQUEST`]).
    fn end(&self, snapshot: &Self::Snapshot, finished: Finished<'_, Self::Tag>);
    /// Runs for an admitted request just before the inner service gets it:
    /// puts in its extensions what the inner service needs of this decision
    /// (the daemon: which upstream pool the matched route goes to, under
    /// the config the route was matched with).
    fn admitted(&self, _snapshot: &Self::Snapshot, _decision: &Decision, _extensions: &mut http::Extensions) {
    }
    /// Runs instead of [`begin`](Self::begin) and [`end`](Self::end) for
    /// a request answered 400 before any control looked at it (see
    /// [`BadRequest`]): nothing was charged to the client.
    fn bad_request(&self, _request: &Malformed<'_>) {}
    /// The TLS fingerprint (JA4) of the connection this pipeline serves,
    /// when the server terminating TLS computed one: what a `ja4` limit key
    /// and the breaker's `ja4` fingerprint count by. The library's layers
    /// see no TLS handshake, so by default there is none.
    fn tls_fingerprint(&self) -> Option<&str> {
        None
    }
}

/// What [`Pipeline::bad_request`] learns about a request refused with 400
/// before any control.
#[derive(Debug)]
pub struct Malformed<'a> {
    /// The TCP peer (no forwarding header was believed).
    pub peer: IpAddr,
    /// Request method.
    pub method: &'a http::Method,
    /// The target as received (path and query).
    pub target: &'a str,
    /// HTTP version.
    pub version: http::Version,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
    /// The status answered.
    pub status: StatusCode,
    /// The answer's body length.
    pub body_len: Option<u64>,
}

/// The target as logs show it: path and query, or CONNECT's authority.
pub fn request_target(uri: &http::Uri) -> &str {
    match uri.path_and_query() {
        Some(pq) => pq.as_str(),
        None => uri.authority().map_or("", |a| a.as_str()),
    }
}

/// What [`Pipeline::end`] learns about a request.
#[derive(Debug)]
pub struct Finished<'a, T> {
    /// The decision it was made.
    pub decision: &'a Decision,
    /// What [`Pipeline::begin`] returned.
    pub tag: T,
    /// The status answered (500 when the inner service failed, 499 when the
    /// client went away before the answer).
    pub status: StatusCode,
    /// The response's extensions (empty when the inner service failed).
    pub extensions: Option<&'a Extensions>,
    /// The body length the response declared (`Content-Length`, or the
    /// exact size of a local answer); `None` when it streams without one.
    pub body_len: Option<u64>,
    /// What the response changed (reputation penalty, breaker change).
    pub effects: ResponseEffects,
}

impl<C: Clock> Pipeline for Arc<Shield<C>> {
    type Clock = C;
    type Snapshot = Self;
    type Tag = ();

    fn load(&self) -> Self {
        self.clone()
    }

    fn shield<'a>(&self, snapshot: &'a Self) -> &'a Shield<C> {
        snapshot
    }

    fn begin(&self, _: &Self, _: &RequestFacts<'_>, _: &mut Decision) {}

    fn end(&self, _: &Self, f: Finished<'_, ()>) {
        // Breaker changes are rare by construction: always worth a line.
        for t in [f.decision.transition, f.effects.transition]
            .into_iter()
            .flatten()
        {
            tracing::warn!(
                client = ?t.ip,
                from = t.from.as_str(),
                to = t.to.as_str(),
                reason = t.reason.as_str(),
                "adaptive breaker"
            );
        }
    }
}

/// The client address a [`ShieldService`] resolved (the peer, or the
/// client a trusted proxy named), in the request's extensions for the
/// handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// The connection's peer address.
///
/// With axum over an [`AdmissionListener`](crate::AdmissionListener), serve
/// `app.into_make_service_with_connect_info::<PeerAddr>()` (over a plain
/// `TcpListener`, `ConnectInfo<SocketAddr>` works too). Servers that
/// neither use `ConnectInfo` nor build a service per connection
/// ([`ShieldService::with_peer`]) put it in each request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// A response extension: this answer came from a protection layer (a
/// breaker's 503), not from the service, so it says nothing about the client
/// and is not held against its reputation or its adaptive breaker. Set it on
/// refusals of your own inner layers for the same effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRefusal(pub RejectReason);

/// A request answered before it reached the inner service.
#[derive(Debug)]
pub struct Early {
    response: Response<Full<Bytes>>,
    why: Why,
}

#[derive(Debug)]
enum Why {
    Refused(Rejection),
    MissingPeer,
    BadRequest(BadRequest),
    Answered,
}

/// A request refused with 400 before any control looked at it: its path or
/// its `Host` could name two different things to two servers, so neither a
/// route nor the upstream could be sure what it asks for. The error of the
/// [`Fail`] variants in that case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// The path cannot be normalized.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A `Host` or authority that is not printable ASCII.
    #[error(transparent)]
    Host(#[from] HostError),
    /// More than one `Host` line (RFC 9112 §3.2).
    #[error("more than one host header")]
    DuplicateHost,
    /// `Host` names another authority than the absolute-form target or
    /// HTTP/2 `:authority`.
    #[error("host header disagrees with the request target")]
    HostMismatch,
    /// The header, cookie or query parameter a limit counts by, sent more
    /// than once: the limit could count one copy and the application read
    /// another.
    #[error("rate limit key sent more than once")]
    DuplicateKey,
}

impl Early {
    pub(crate) fn refused(rejection: Rejection, policy_name: &str) -> Self {
        Self {
            response: respond::rejection(&rejection, policy_name),
            why: Why::Refused(rejection),
        }
    }

    /// A refusal an outer [`ShieldLayer`] must not count against the client.
    pub(crate) fn refused_locally(rejection: Rejection, policy_name: &str) -> Self {
        let mut early = Self::refused(rejection, policy_name);
        early
            .response
            .extensions_mut()
            .insert(LocalRefusal(rejection.reason));
        early
    }

    fn answered(response: Response<Full<Bytes>>) -> Self {
        Self {
            response,
            why: Why::Answered,
        }
    }

    fn missing_peer() -> Self {
        Self {
            response: respond::text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error\n"),
            why: Why::MissingPeer,
        }
    }

    fn bad_request(e: impl Into<BadRequest>) -> Self {
        Self {
            response: respond::text(StatusCode::BAD_REQUEST, "Bad Request\n"),
            why: Why::BadRequest(e.into()),
        }
    }
}

/// The error of the [`Fail`] variants when a request is refused. Its
/// [`response`](Self::response) is what the [`Respond`] variant would
/// have sent.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub rejection: Rejection,
    /// 403, 429 or 503 with its headers.
    pub response: Response<Full<Bytes>>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused by palisade: {}", self.rejection.reason)
    }
}

impl std::error::Error for Refused {}

/// The error of the [`Fail`] variants when no peer address is known: the
/// server passes neither `ConnectInfo`, [`PeerAddr`] nor
/// [`ShieldService::with_peer`].
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "palisade: no peer address on the request (serve axum with into_make_service_with_connect_info::<palisade::PeerAddr>())"
)]
pub struct MissingPeer;

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for Refused {
    fn into_response(self) -> axum::response::Response {
        self.response.map(axum::body::Body::new)
    }
}

/// The error of the [`Fail`] variants for a request a [`Pipeline`]
/// answered itself ([`Pipeline::answer`]): its response is to be sent.
#[derive(Debug)]
pub struct Answered(pub Response<Full<Bytes>>);

impl std::fmt::Display for Answered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("answered by the palisade pipeline")
    }
}

impl std::error::Error for Answered {}

/// Errors boxed as tower's middleware errors are.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a layer answers a refusal. Sealed: [`Respond`] or [`Fail`].
pub trait Reply<B, E>: sealed::Sealed {
    /// The response type.
    type Response;
    /// The error type.
    type Error;
    /// A request answered early.
    fn early(early: Early) -> Result<Self::Response, Self::Error>;
    /// What the inner service returned.
    fn pass(result: Result<Response<B>, E>) -> Result<Self::Response, Self::Error>;
    /// An error of the inner service.
    fn error(e: E) -> Self::Error;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Respond {}
    impl Sealed for super::Fail {}
}

/// Layers answer refusals themselves (403/429/503 with `Retry-After` and
/// `RateLimit` headers): no `HandleErrorLayer` needed. The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Respond;

/// Layers return refusals as errors ([`Refused`], boxed; a malformed request
/// is a boxed [`BadRequest`]) for a
/// `HandleErrorLayer` or your own error handling.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fail;

impl<B, E> Reply<B, E> for Respond {
    type Response = Response<Either<B, Full<Bytes>>>;
    type Error = E;

    fn early(early: Early) -> Result<Self::Response, E> {
        Ok(early.response.map(Either::Right))
    }

    fn pass(result: Result<Response<B>, E>) -> Result<Self::Response, E> {
        result.map(|r| r.map(Either::Left))
    }

    fn error(e: E) -> E {
        e
    }
}

impl<B, E: Into<BoxError>> Reply<B, E> for Fail {
    type Response = Response<B>;
    type Error = BoxError;

    fn early(early: Early) -> Result<Self::Response, BoxError> {
        Err(match early.why {
            Why::Refused(rejection) => Box::new(Refused {
                rejection,
                response: early.response,
            }),
            Why::MissingPeer => Box::new(MissingPeer),
            Why::BadRequest(e) => Box::new(e),
            Why::Answered => Box::new(Answered(early.response)),
        })
    }

    fn pass(result: Result<Response<B>, E>) -> Result<Self::Response, BoxError> {
        result.map_err(Into::into)
    }

    fn error(e: E) -> BoxError {
        e.into()
    }
}

/// The shield as a tower [`Layer`].
///
/// Cloning is cheap and clones share their state: every service the layer
/// makes counts against the same per-client tables.
pub struct ShieldLayer<P = Arc<Shield<MonotonicClock>>, M = Respond> {
    pipeline: P,
    expose_client: bool,
    reply: PhantomData<fn() -> M>,
}

impl<P: Clone, M> Clone for ShieldLayer<P, M> {
    fn clone(&self) -> Self {
        Self {
            pipeline: self.pipeline.clone(),
            expose_client: self.expose_client,
            reply: PhantomData,
        }
    }
}

impl ShieldLayer {
    /// Every control `cfg` enables, on the monotonic clock.
    pub fn new(cfg: ShieldConfig) -> Self {
        Self::with_shield(Arc::new(Shield::new(cfg, MonotonicClock::new())))
    }

    /// Only a per-client rate limit (`quota` per client address).
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::num::NonZeroU32;
    /// use bytes::Bytes;
    /// use http::{Request, Response, StatusCode};
    /// use http_body_util::Full;
    /// use palisade::{PeerAddr, Quota, ShieldLayer};
    /// use tower::{Layer, ServiceExt, service_fn};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let app = service_fn(|_req: Request<Full<Bytes>>| async {
    ///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
    /// });
    /// let svc = ShieldLayer::rate_limit(Quota::per_second(NonZeroU32::new(3).unwrap())).layer(app);
    /// let peer = PeerAddr("192.0.2.7:40000".parse().unwrap());
    /// let mut refused = 0;
    /// for _ in 0..5 {
    ///     let mut req = Request::new(Full::default());
    ///     req.extensions_mut().insert(peer);
    ///     let res = svc.clone().oneshot(req).await.unwrap();
    ///     if res.status() == StatusCode::TOO_MANY_REQUESTS {
    ///         assert!(res.headers().contains_key("retry-after"));
    ///         refused += 1;
    ///     }
    /// }
    /// assert_eq!(refused, 2); // 3 a second from one address: the 4th and 5th wait
    /// # });
    /// ```
    pub fn rate_limit(quota: Quota) -> Self {
        Self::new(ShieldConfig {
            limit: Some(LimitPolicy {
                quota,
                mode: palisade_core::Mode::Enforce,
            }),
            reputation: None,
            adaptive: None,
            ..ShieldConfig::default()
        })
    }

    /// Only reputation: clients that flood or pile up 400/401 streaks lose
    /// points and are refused with 403 below the threshold, then recover.
    ///
    /// ```
    /// use palisade::{ReputationConfig, ShieldLayer};
    ///
    /// // Refuse below 30 points instead of the default threshold.
    /// let layer = ShieldLayer::reputation(ReputationConfig { block_below: 30, ..ReputationConfig::default() });
    /// # let _ = layer;
    /// ```
    pub fn reputation(cfg: ReputationConfig) -> Self {
        Self::new(ShieldConfig {
            limit: None,
            reputation: Some((cfg, palisade_core::Mode::Enforce)),
            adaptive: None,
            ..ShieldConfig::default()
        })
    }

    /// Only the adaptive per-client breaker: a client whose requests fail
    /// (5xx) or are slow is slowed down, then refused, then probed.
    ///
    /// ```
    /// use palisade::{AdaptiveConfig, ShieldLayer};
    ///
    /// let layer = ShieldLayer::adaptive_breaker(AdaptiveConfig::default());
    /// # let _ = layer;
    /// ```
    pub fn adaptive_breaker(cfg: AdaptiveConfig) -> Self {
        Self::new(ShieldConfig {
            limit: None,
            reputation: None,
            adaptive: Some((cfg, palisade_core::Mode::Enforce)),
            ..ShieldConfig::default()
        })
    }
}

impl<C: Clock> ShieldLayer<Arc<Shield<C>>> {
    /// A layer over an existing shield (your own clock, or a shield you
    /// also read from elsewhere).
    pub fn with_shield(shield: Arc<Shield<C>>) -> Self {
        Self::with_pipeline(shield)
    }

    /// The shield (tables, reputation, breaker state).
    pub fn shield(&self) -> &Arc<Shield<C>> {
        &self.pipeline
    }
}

impl<P: Pipeline> ShieldLayer<P> {
    /// A layer over a custom [`Pipeline`].
    pub fn with_pipeline(pipeline: P) -> Self {
        Self {
            pipeline,
            expose_client: true,
            reply: PhantomData,
        }
    }
}

impl<P: Pipeline, M> ShieldLayer<P, M> {
    /// Refusals become errors ([`Refused`]) instead of responses.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::num::NonZeroU32;
    /// use http::{Request, Response};
    /// use palisade::{PeerAddr, Quota, Refused, ShieldLayer};
    /// use tower::{Layer, ServiceExt, service_fn};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let app = service_fn(|_req: Request<String>| async { Ok::<_, Infallible>(Response::new(String::new())) });
    /// let svc = ShieldLayer::rate_limit(Quota::per_second(NonZeroU32::new(1).unwrap()))
    ///     .errors()
    ///     .layer(app);
    /// let req = || {
    ///     let mut r = Request::new(String::new());
    ///     r.extensions_mut().insert(PeerAddr("192.0.2.7:40000".parse().unwrap()));
    ///     r
    /// };
    /// assert!(svc.clone().oneshot(req()).await.is_ok());
    /// let err = svc.clone().oneshot(req()).await.unwrap_err();
    /// let refused = err.downcast_ref::<Refused>().expect("a refusal, not the service's error");
    /// assert_eq!(refused.response.status(), 429);
    /// # });
    /// ```
    pub fn errors(self) -> ShieldLayer<P, Fail> {
        ShieldLayer {
            pipeline: self.pipeline,
            expose_client: self.expose_client,
            reply: PhantomData,
        }
    }

    /// Whether admitted requests carry a [`ClientIp`] extension (on by
    /// default; off spares the extension map's allocations when nobody
    /// reads it: the layer itself then allocates nothing per request).
    pub fn expose_client_ip(mut self, on: bool) -> Self {
        self.expose_client = on;
        self
    }
}

impl<S, P: Pipeline, M> Layer<S> for ShieldLayer<P, M> {
    type Service = ShieldService<S, P, M>;

    fn layer(&self, inner: S) -> Self::Service {
        ShieldService {
            inner,
            pipeline: self.pipeline.clone(),
            peer: None,
            expose_client: self.expose_client,
            reply: PhantomData,
        }
    }
}

/// The service a [`ShieldLayer`] makes.
pub struct ShieldService<S, P = Arc<Shield<MonotonicClock>>, M = Respond> {
    inner: S,
    pipeline: P,
    peer: Option<SocketAddr>,
    expose_client: bool,
    reply: PhantomData<fn() -> M>,
}

impl<S: Clone, P: Clone, M> Clone for ShieldService<S, P, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            pipeline: self.pipeline.clone(),
            peer: self.peer,
            expose_client: self.expose_client,
            reply: PhantomData,
        }
    }
}

impl<S, P, M> ShieldService<S, P, M> {
    /// Fixes the peer address for every request (a service built per
    /// connection, as with plain hyper). Without it the peer comes from
    /// axum's `ConnectInfo<PeerAddr>` or `ConnectInfo<SocketAddr>`, or a
    /// [`PeerAddr`] extension.
    pub fn with_peer(mut self, peer: SocketAddr) -> Self {
        self.peer = Some(peer);
        self
    }

    fn peer(&self, ext: &Extensions) -> Option<SocketAddr> {
        if self.peer.is_some() {
            return self.peer;
        }
        #[cfg(feature = "axum")]
        {
            use axum::extract::ConnectInfo;
            if let Some(ConnectInfo(PeerAddr(addr))) = ext.get::<ConnectInfo<PeerAddr>>() {
                return Some(*addr);
            }
            if let Some(ConnectInfo(addr)) = ext.get::<ConnectInfo<SocketAddr>>() {
                return Some(*addr);
            }
        }
        ext.get::<PeerAddr>().map(|p| p.0)
    }
}

impl<S, P: Pipeline, M> ShieldService<S, P, M> {
    /// The 400 for a request no control may look at, told to the pipeline.
    fn malformed<B>(&self, peer: SocketAddr, req: &Request<B>, e: impl Into<BadRequest>) -> Early {
        let early = Early::bad_request(e);
        self.pipeline.bad_request(&Malformed {
            peer: peer.ip(),
            method: req.method(),
            target: request_target(req.uri()),
            version: req.version(),
            headers: req.headers(),
            status: early.response.status(),
            body_len: http_body::Body::size_hint(early.response.body()).exact(),
        });
        early
    }
}

/// Warned about once per process: a server set up without peer addresses
/// answers 500 to everything, which must not go unnoticed, nor flood logs.
static MISSING_PEER_WARNED: AtomicBool = AtomicBool::new(false);

impl<S, P, M, ReqB, ResB> Service<Request<ReqB>> for ShieldService<S, P, M>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    P: Pipeline,
    M: Reply<ResB, S::Error>,
{
    type Response = M::Response;
    type Error = M::Error;
    type Future = ResponseFuture<S::Future, P, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(M::error)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let Some(peer) = self.peer(req.extensions()) else {
            if !MISSING_PEER_WARNED.swap(true, Ordering::Relaxed) {
                tracing::error!("{MissingPeer}");
            }
            return ResponseFuture::new(Answer::early(Early::missing_peer()));
        };
        // Routes match, and the inner service gets, one spelling of the
        // path: `/%6Cogin` and `/x/../login` are `/login` to both.
        match normalize_path(req.uri().path()) {
            Ok(std::borrow::Cow::Borrowed(_)) => {}
            Ok(std::borrow::Cow::Owned(path)) => {
                let Some(uri) = with_path(req.uri(), &path) else {
                    return ResponseFuture::new(Answer::early(self.malformed(
                        peer,
                        &req,
                        PathError::InvalidPercentEncoding,
                    )));
                };
                *req.uri_mut() = uri;
            }
            Err(e) => return ResponseFuture::new(Answer::early(self.malformed(peer, &req, e))),
        }
        let snapshot = self.pipeline.load();
        let shield = self.pipeline.shield(&snapshot);
        let (decision, tag) = {
            let host = match single_host(&req) {
                Ok(host) => host,
                Err(e) => return ResponseFuture::new(Answer::early(self.malformed(peer, &req, e))),
            };
            // Forwarded with its parameters; matched without, as servers
            // that drop them route.
            let path = match route_path(req.uri().path()) {
                Ok(path) => path,
                Err(e) => return ResponseFuture::new(Answer::early(self.malformed(peer, &req, e))),
            };
            let target = request_target(req.uri());
            let facts = RequestFacts {
                peer: peer.ip(),
                method: req.method(),
                host: host.as_deref(),
                path: &path,
                target,
                version: req.version(),
                headers: req.headers(),
                tls_fingerprint: self.pipeline.tls_fingerprint(),
            };
            if shield.sends_key_twice(&facts) {
                return ResponseFuture::new(Answer::early(self.malformed(
                    peer,
                    &req,
                    BadRequest::DuplicateKey,
                )));
            }
            let mut decision = shield.decide_with(&facts, |ip| self.pipeline.banned(&snapshot, ip));
            let tag = self.pipeline.begin(&snapshot, &facts, &mut decision);
            (decision, tag)
        };
        let mut tag = tag;
        // Refused by the shield, or answered by the pipeline itself (a
        // challenge page, say): either way the upstream never sees it.
        let early = match decision.rejection {
            Some(rejection) => {
                let name = shield
                    .limit_for(decision.route)
                    .map_or("default", |(name, _, _)| name);
                Some(Early::refused(rejection, name))
            }
            None => self.pipeline.answer(&mut tag).map(Early::answered),
        };
        if let Some(early) = early {
            self.pipeline.end(
                &snapshot,
                Finished {
                    decision: &decision,
                    tag,
                    status: early.response.status(),
                    extensions: Some(early.response.extensions()),
                    body_len: http_body::Body::size_hint(early.response.body()).exact(),
                    effects: ResponseEffects::default(),
                },
            );
            return ResponseFuture::new(Answer::early(early));
        }
        if self.expose_client {
            req.extensions_mut().insert(ClientIp(decision.client_ip));
        }
        self.pipeline.admitted(&snapshot, &decision, req.extensions_mut());
        ResponseFuture::new(Answer::called(
            self.inner.call(req),
            Some(Watch(Some(Watched {
                pipeline: self.pipeline.clone(),
                snapshot,
                decision,
                tag,
            }))),
        ))
    }
}

/// At most one `Host`, and the same authority as the target when both are
/// given: otherwise a route on one host and the upstream may each read
/// another. Returns the host routes match, in its compared form (case, one
/// trailing dot and the scheme's default port do not count).
fn single_host<B>(req: &Request<B>) -> Result<Option<std::borrow::Cow<'_, str>>, BadRequest> {
    let default_port = match req.uri().scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    };
    let authority = req
        .uri()
        .authority()
        .map(|a| normalize_host(a.as_str().as_bytes(), default_port))
        .transpose()?;
    let mut hosts = req.headers().get_all(HOST).iter();
    let Some(host) = hosts.next() else {
        return Ok(authority);
    };
    if hosts.next().is_some() {
        return Err(BadRequest::DuplicateHost);
    }
    let host = normalize_host(host.as_bytes(), default_port)?;
    match authority {
        Some(a) if a != host => Err(BadRequest::HostMismatch),
        _ => Ok(Some(host)),
    }
}

/// `uri` with its path replaced, scheme, authority and query kept.
fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// The status a request the client abandoned ends with (nginx's "client
/// closed request"): its future was dropped before the inner service
/// answered.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// A request on its way through the inner service. It ends in
/// [`Pipeline::end`] exactly once: with the answer, or, when its future is
/// dropped first (the client went away), as 499.
struct Watch<P: Pipeline>(Option<Watched<P>>);

struct Watched<P: Pipeline> {
    pipeline: P,
    snapshot: P::Snapshot,
    decision: Decision,
    tag: P::Tag,
}

impl<P: Pipeline> Drop for Watch<P> {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            // Neither a success nor a failure of the service: the client's
            // score and breaker are not fed.
            let status = StatusCode::from_u16(CLIENT_CLOSED_REQUEST).unwrap_or(StatusCode::BAD_REQUEST);
            w.pipeline.end(
                &w.snapshot,
                Finished {
                    decision: &w.decision,
                    tag: w.tag,
                    status,
                    extensions: None,
                    body_len: Some(0),
                    effects: ResponseEffects::default(),
                },
            );
        }
    }
}

impl<P: Pipeline> Watch<P> {
    fn finish(mut self, status: StatusCode, extensions: Option<&Extensions>, body_len: Option<u64>) {
        if let Some(w) = self.0.take() {
            w.finish(status, extensions, body_len);
        }
    }
}

impl<P: Pipeline> Watched<P> {
    fn finish(self, status: StatusCode, extensions: Option<&Extensions>, body_len: Option<u64>) {
        let shield = self.pipeline.shield(&self.snapshot);
        // Allow-listed clients are outside every control, responses
        // included; a layer's own refusal says nothing about the client.
        let local = extensions.is_some_and(|e| e.get::<LocalRefusal>().is_some());
        let effects = if self.decision.exempt || local {
            ResponseEffects::default()
        } else {
            shield.observe_response(&self.decision, status.as_u16())
        };
        self.pipeline.end(
            &self.snapshot,
            Finished {
                decision: &self.decision,
                tag: self.tag,
                status,
                extensions,
                body_len,
                effects,
            },
        );
    }
}

impl<P: Pipeline, B, E> Finish<B, E> for Watch<P> {
    fn finish(self, result: &mut Result<Response<B>, E>) {
        if let (Ok(r), Some(w)) = (&mut *result, &self.0)
            && let Some(allowance) = &w.decision.allowance
        {
            let name = w.pipeline.shield(&w.snapshot).route_name(allowance.limiter);
            respond::allowance_fields(r.headers_mut(), name, allowance);
        }
        match result {
            Ok(r) => {
                let len = r
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                Watch::finish(self, r.status(), Some(r.extensions()), len)
            }
            Err(_) => Watch::finish(self, StatusCode::INTERNAL_SERVER_ERROR, None, None),
        }
    }
}

/// What a layer's future does with the inner service's result once it
/// arrives: the shield feeds it back, the breaker records the outcome.
pub(crate) trait Finish<B, E> {
    /// Sees the result, and may add to the response (its rate-limit fields).
    fn finish(self, result: &mut Result<Response<B>, E>);
}

pin_project_lite::pin_project! {
    /// The state machine of both layers' futures: answered before the
    /// inner service, or waiting on it with something to `finish`.
    #[project = AnswerProj]
    pub(crate) enum Answer<F, D> {
        Early { early: Option<Early> },
        Called { #[pin] fut: F, done: Option<D> },
    }
}

impl<F, D> Answer<F, D> {
    pub(crate) fn early(early: Early) -> Self {
        Self::Early { early: Some(early) }
    }

    pub(crate) fn called(fut: F, done: Option<D>) -> Self {
        Self::Called { fut, done }
    }

    /// Polls to the reply; `name` is the public future's, for the panic.
    pub(crate) fn poll_reply<M, B, E>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        name: &str,
    ) -> Poll<Result<M::Response, M::Error>>
    where
        F: Future<Output = Result<Response<B>, E>>,
        D: Finish<B, E>,
        M: Reply<B, E>,
    {
        match self.project() {
            AnswerProj::Early { early } => match early.take() {
                Some(early) => Poll::Ready(M::early(early)),
                None => panic!("{name} polled after completion"),
            },
            AnswerProj::Called { fut, done } => {
                let mut result = ready!(fut.poll(cx));
                if let Some(d) = done.take() {
                    d.finish(&mut result);
                }
                Poll::Ready(M::pass(result))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`ShieldService`] call.
    pub struct ResponseFuture<F, P: Pipeline, M> {
        #[pin]
        state: Answer<F, Watch<P>>,
        reply: PhantomData<fn() -> M>,
    }
}

impl<F, P: Pipeline, M> ResponseFuture<F, P, M> {
    fn new(state: Answer<F, Watch<P>>) -> Self {
        Self {
            state,
            reply: PhantomData,
        }
    }
}

impl<F, P, M, B, E> Future for ResponseFuture<F, P, M>
where
    F: Future<Output = Result<Response<B>, E>>,
    P: Pipeline,
    M: Reply<B, E>,
{
    type Output = Result<M::Response, M::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().state.poll_reply::<M, B, E>(cx, "ResponseFuture")
    }
}
