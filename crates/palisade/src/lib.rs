//! Anti-DDoS protection for Rust HTTP services, as tower layers: the same
//! code the `palisade` reverse-proxy daemon runs its requests through.
//!
//! - **Per-client rate limits** (GCRA with a 1-second window cap), per
//!   route, on bounded tables: memory is fixed up front, however many
//!   addresses an attacker rotates through.
//! - **Reputation**: clients that flood or pile up 400/401 streaks lose
//!   points and are refused (403) below a threshold, then recover.
//! - **Adaptive breaker** per client (failures and slow answers slow it
//!   down, then refuse it) and the **classic breaker** around your service
//!   (503 without calling it while it keeps failing).
//! - **Connection guard** at `accept()`: open connections overall and per
//!   address, new connections per second; refused sockets are reset before
//!   a byte is read.
//! - **Client identity** done right: the TCP peer, unless it is one of
//!   your `trusted_proxies` (then `X-Forwarded-For`/`Forwarded`, read from
//!   the right), or a PROXY protocol header from a trusted proxy.
//!
//! Refused requests are answered by the layers themselves — 429 with
//! `Retry-After`, `RateLimit-Policy` and `RateLimit`; 403; 503 with
//! `Retry-After` — so axum needs no `HandleErrorLayer`. To handle refusals
//! yourself, [`ShieldLayer::errors`] and [`BreakerLayer::errors`] return
//! them as [`Refused`] errors instead.
//!
//! # axum
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use palisade::{ClientIp, Palisade, PeerAddr};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let palisade = Palisade::builder()
//!     .rate_limit(20) // per client address, per second
//!     .burst(40)
//!     .route("login", "/login", 1)
//!     .build()?;
//! let app = Router::new()
//!     .route("/", get(|axum::Extension(ClientIp(ip)): axum::Extension<ClientIp>| async move {
//!         format!("hello {ip}\n")
//!     }))
//!     .layer(palisade.layer());
//! // The connection guard, and the peer address the layers need:
//! let listener = palisade.bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<PeerAddr>()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! The same stack from the daemon's config file (its `[clients]`,
//! `[rate_limit]`, `[reputation]`, `[adaptive_breaker]`, `[breaker]`,
//! `[connections]` and `[[routes]]` sections):
//!
//! ```no_run
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let palisade = palisade::Palisade::from_file("palisade.toml")?;
//! # Ok(())
//! # }
//! ```
//!
//! Single layers: [`ShieldLayer::rate_limit`], [`ShieldLayer::reputation`],
//! [`ShieldLayer::adaptive_breaker`], [`BreakerLayer::new`],
//! [`AdmissionListener::bind`].
//!
//! # Plain hyper
//!
//! Build the service per connection and give it the peer with
//! [`ShieldService::with_peer`]; see `examples/hyper.rs`. Other servers put
//! a [`PeerAddr`] in each request's extensions.
//!
//! # Feature flags
//!
//! - `axum` (default): [`AdmissionListener`] implements
//!   `axum::serve::Listener`; the layers read the peer from axum's
//!   `ConnectInfo<SocketAddr>`; [`Refused`] implements `IntoResponse`.
//! - `config` (default): [`Palisade::from_file`] and the [`config`]
//!   module (serde + toml).

mod breaker;
mod builder;
#[cfg(feature = "config")]
pub mod config;
mod listener;
pub mod respond;
mod shield;

pub use breaker::{BreakerFuture, BreakerLayer, BreakerService, BreakerSettings, StatusSet};
pub use builder::{BuildError, Builder, Palisade, PalisadeLayer, Route};
pub use listener::{AdmissionListener, Admitted, read_proxy_header};
pub use shield::{
    Answered, BadRequest, BoxError, CLIENT_CLOSED_REQUEST, ClientIp, Early, Fail, Finished, LocalRefusal,
    Malformed, MissingPeer, PeerAddr, Pipeline, Refused, Reply, Respond, ResponseFuture, ShieldLayer,
    ShieldService, request_target,
};

pub use ipnet::IpNet;
pub use palisade_core::{
    ClientIpHeader, Clock, ManualClock, Mode, MonotonicClock, PathError, RejectReason, TrustedProxies,
};
pub use palisade_limits::adaptive::AdaptiveConfig;
pub use palisade_limits::admission::{Admission, AdmissionConfig, Refusal};
pub use palisade_limits::breaker::{BreakerConfig, BreakerState};
pub use palisade_limits::rate::{Headroom, Period, Quota};
pub use palisade_limits::reputation::ReputationConfig;
pub use palisade_limits::shield::{
    Allowance, Decision, KeyExtractor, LimitKey, LimitPolicy, RateHeaders, Rejection, RequestFacts,
    ResponseEffects, Shield, ShieldConfig,
};
pub use palisade_store::StoreCell;
