//! [`Palisade`]: every layer composed in the right order, from code or from
//! the daemon's config file.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use palisade_core::{ClientIpHeader, Clock, Mode, MonotonicClock, TrustedProxies};
use palisade_limits::adaptive::AdaptiveConfig;
use palisade_limits::admission::{Admission, AdmissionConfig};
use palisade_limits::breaker::Breaker;
use palisade_limits::rate::{Period, Quota};
use palisade_limits::reputation::ReputationConfig;
use palisade_limits::shield::{
    LimitKey, LimitPolicy, RateHeaders, RouteConfig, RouteMatch, Shield, ShieldConfig,
};
use palisade_store::StoreCell;
use tokio::net::{TcpListener, ToSocketAddrs};
use tower_layer::Layer;

use crate::breaker::{BreakerLayer, BreakerService, BreakerSettings};
use crate::listener::AdmissionListener;
use crate::shield::{ShieldLayer, ShieldService};

/// Largest rate, burst or window limit, as in the config file.
const MAX_RATE: u32 = 10_000_000;

/// A built protection stack: one shield (per-client tables, reputation,
/// adaptive breaker), one classic breaker and one connection guard, shared
/// by every layer and listener made from it.
///
/// Order, outermost first: the connection guard at `accept()`
/// ([`bind`](Self::bind)), then allow/deny lists, the reputation store,
/// learned reputation, the rate limit and the adaptive breaker
/// ([`ShieldLayer`]), then the classic breaker ([`BreakerLayer`]) around
/// your handlers. Cheap, certain refusals come first; the breaker only
/// sees requests the shield admitted, so an attacker's refused requests
/// never trip it.
pub struct Palisade<C: Clock = MonotonicClock> {
    shield: Arc<Shield<C>>,
    breaker: BreakerLayer<C>,
    admission: Arc<Admission>,
    proxy_protocol: Option<Duration>,
}

/// Why [`Builder::build`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("palisade: {setting}: {message}")]
pub struct BuildError {
    /// The setting, named as in the config file (`rate_limit.rate`).
    pub setting: String,
    /// What is wrong.
    pub message: String,
}

fn invalid(setting: impl Into<String>, message: impl Into<String>) -> BuildError {
    BuildError {
        setting: setting.into(),
        message: message.into(),
    }
}

/// A route with a limit of its own, for [`Builder::limited_route`]: what
/// a `[[routes]]` entry with a `path_prefix` says in the config file.
#[derive(Debug, Clone)]
pub struct Route {
    name: String,
    path_prefix: String,
    quota: Quota,
    key: LimitKey,
    headers: Option<RateHeaders>,
    anonymous: Option<Quota>,
}

impl Route {
    /// Requests whose path starts with `path_prefix` (on segment
    /// boundaries), labelled `name`, limited by `quota` per client.
    pub fn new(name: &str, path_prefix: &str, quota: Quota) -> Self {
        Self {
            name: name.to_string(),
            path_prefix: path_prefix.to_string(),
            quota,
            key: LimitKey::Client,
            headers: None,
            anonymous: None,
        }
    }

    /// `key`: what the route's limit counts by. A key taken from the
    /// request is counted beside the client's default limit, not instead.
    pub fn key(mut self, key: LimitKey) -> Self {
        self.key = key;
        self
    }

    /// `headers`: which responses carry `RateLimit` (without it, the
    /// default limit's setting).
    pub fn headers(mut self, headers: RateHeaders) -> Self {
        self.headers = Some(headers);
        self
    }

    /// `anonymous_rate`: with a key taken from the request, the limit of
    /// the requests that do not carry it, counted by client. Palisade does
    /// not check keys: any value of the key counts as keyed.
    pub fn anonymous(mut self, quota: Quota) -> Self {
        self.anonymous = Some(quota);
        self
    }
}

impl Palisade {
    /// Starts from the daemon's defaults: 100 requests/s per client
    /// address (burst 100), reputation, the adaptive per-client breaker and
    /// the classic breaker on, at most 100 open connections and 50 new ones
    /// per second per address, no trusted proxies.
    ///
    /// ```
    /// use palisade::{ManualClock, Palisade};
    ///
    /// let palisade = Palisade::builder()
    ///     .rate_limit(50)
    ///     .burst(100)
    ///     .route("login", "/login", 2)
    ///     .clock(ManualClock::new()) // tests drive time by hand
    ///     .build()
    ///     .expect("valid settings");
    /// let _layer = palisade.layer();
    /// ```
    pub fn builder() -> Builder {
        Builder::new(MonotonicClock::new())
    }

    /// The protection sections of a `palisade` daemon config file
    /// (`[clients]`, `[rate_limit]`, `[reputation]`, `[adaptive_breaker]`,
    /// `[breaker]`, `[connections]`, `[[routes]]`, and `server.proxy_protocol`
    /// with `server.header_read_timeout`); its other keys are the daemon's
    /// and ignored. Errors name the file, line, column and key.
    #[cfg(feature = "config")]
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self, crate::config::ConfigError> {
        Ok(Self::from_config(crate::config::Protection::load(path)?))
    }

    /// A stack from already-parsed config sections.
    #[cfg(feature = "config")]
    pub fn from_config(protection: crate::config::Protection) -> Self {
        Builder {
            shield: protection.shield,
            breaker: protection.breaker,
            connections: protection.connections,
            proxy_protocol: protection.proxy_protocol,
            ..Builder::new(MonotonicClock::new())
        }
        .assemble()
    }
}

impl<C: Clock + Clone> Palisade<C> {
    /// The request-side layers, to add to an axum `Router` (`.layer(...)`)
    /// or any tower stack. Every clone counts against the same tables.
    pub fn layer(&self) -> PalisadeLayer<C> {
        PalisadeLayer {
            shield: ShieldLayer::with_shield(self.shield.clone()),
            breaker: self.breaker.clone(),
        }
    }

    /// Binds a listener that admits connections before the server sees
    /// them (see [`AdmissionListener`]).
    pub async fn bind(&self, addr: impl ToSocketAddrs) -> std::io::Result<AdmissionListener> {
        Ok(self.listener(TcpListener::bind(addr).await?))
    }

    /// Wraps a bound listener with the connection guard.
    pub fn listener(&self, listener: TcpListener) -> AdmissionListener {
        let cfg = self.shield.config();
        let l = AdmissionListener::with_admission(listener, self.admission.clone())
            .lists(cfg.allow.clone(), cfg.deny.clone());
        match self.proxy_protocol {
            Some(timeout) => l.proxy_protocol(cfg.trusted_proxies.clone(), timeout),
            None => l,
        }
    }

    /// The shield: per-client tables, reputation, adaptive breaker.
    pub fn shield(&self) -> &Arc<Shield<C>> {
        &self.shield
    }

    /// The classic breaker, when on.
    pub fn breaker(&self) -> Option<&Arc<Breaker>> {
        self.breaker.breaker()
    }

    /// The connection guard's counts.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }
}

/// The layer [`Palisade::layer`] returns: [`ShieldLayer`] outside,
/// [`BreakerLayer`] inside.
#[derive(Clone)]
pub struct PalisadeLayer<C: Clock = MonotonicClock> {
    shield: ShieldLayer<Arc<Shield<C>>>,
    breaker: BreakerLayer<C>,
}

impl<S, C: Clock + Clone> Layer<S> for PalisadeLayer<C> {
    type Service = ShieldService<BreakerService<S, C>, Arc<Shield<C>>>;

    fn layer(&self, inner: S) -> Self::Service {
        self.shield.layer(self.breaker.layer(inner))
    }
}

/// Builds a [`Palisade`]. Every setting has the config key it mirrors.
#[derive(Debug, Clone)]
pub struct Builder<C = MonotonicClock> {
    shield: ShieldConfig,
    breaker: Option<BreakerSettings>,
    connections: AdmissionConfig,
    proxy_protocol: Option<Duration>,
    clock: C,
    /// The first invalid setting, reported by `build`.
    error: Option<BuildError>,
    /// `reputation()` was called: its flood threshold stays as given.
    reputation_set: bool,
}

impl<C: Clock + Clone> Builder<C> {
    fn new(clock: C) -> Self {
        Self {
            shield: ShieldConfig::default(),
            breaker: Some(BreakerSettings::default()),
            connections: AdmissionConfig::default(),
            proxy_protocol: None,
            clock,
            error: None,
            reputation_set: false,
        }
    }

    /// Decisions on another clock (tests drive time by hand with
    /// `palisade_core::ManualClock`).
    pub fn clock<D: Clock + Clone>(self, clock: D) -> Builder<D> {
        Builder {
            shield: self.shield,
            breaker: self.breaker,
            connections: self.connections,
            proxy_protocol: self.proxy_protocol,
            clock,
            error: self.error,
            reputation_set: self.reputation_set,
        }
    }

    /// `rate_limit.rate`: sustained requests per second per client; burst
    /// and 1-second window limit follow unless set after.
    pub fn rate_limit(mut self, per_second: u32) -> Self {
        let q = self.quota_mut();
        q.rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        q.burst = q.rate;
        q.window_limit = q.rate;
        let rate = q.rate.get();
        // As in the config file: a client flooding at twice its limit loses
        // reputation, unless `reputation()` set the threshold.
        if !self.reputation_set
            && let Some((rep, _)) = &mut self.shield.reputation
        {
            rep.flood_threshold = rate.saturating_mul(2);
        }
        if per_second == 0 {
            // 0 is a mistake, not "off" (that is `no_rate_limit`).
            self.fail("rate_limit.rate", "must be between 1 and 10000000");
        }
        self
    }

    /// `rate_limit.rate = "5/m"`: `count` requests per `per` per client
    /// (one every 12 s at 5 a minute); burst and window limit follow unless
    /// set after.
    pub fn rate_limit_per(self, count: u32, per: Period) -> Self {
        let mut b = self.rate_limit(count);
        b.quota_mut().per = per;
        b
    }

    /// `rate_limit.key`: what the default limit counts by. A key taken from
    /// the request is counted beside the client's own limit, not instead of it.
    ///
    /// A key the config file cannot name comes from a [`KeyExtractor`]:
    ///
    /// ```
    /// use std::borrow::Cow;
    /// use std::sync::Arc;
    /// use palisade::{KeyExtractor, LimitKey, Palisade, Period, RequestFacts};
    ///
    /// /// One limit per tenant, named by `X-Tenant` and `X-Region` together.
    /// #[derive(Debug)]
    /// struct TenantRegion;
    ///
    /// impl KeyExtractor for TenantRegion {
    ///     fn key<'r>(&self, req: &RequestFacts<'r>) -> Option<Cow<'r, [u8]>> {
    ///         let tenant = req.headers.get("x-tenant")?.as_bytes();
    ///         let region = req.headers.get("x-region").map_or(&b""[..], |v| v.as_bytes());
    ///         Some(Cow::Owned([tenant, b"/", region].concat()))
    ///     }
    /// }
    ///
    /// let palisade = Palisade::builder()
    ///     .rate_limit_per(1000, Period::Minute)
    ///     .rate_limit_key(LimitKey::Custom(Arc::new(TenantRegion)))
    ///     .build()?;
    /// # let _ = palisade;
    /// # Ok::<(), palisade::BuildError>(())
    /// ```
    ///
    /// [`KeyExtractor`]: crate::KeyExtractor
    pub fn rate_limit_key(mut self, key: LimitKey) -> Self {
        self.shield.limit_key = key;
        self
    }

    /// `rate_limit.headers`: [`RateHeaders::Always`] gives every response
    /// to a limited request `RateLimit-Policy` and `RateLimit` (`r=` what
    /// is left, `t=` seconds until the bucket is full again), not only
    /// refusals.
    ///
    /// ```
    /// use palisade::{Palisade, RateHeaders};
    ///
    /// let palisade = Palisade::builder()
    ///     .rate_limit(10)
    ///     .rate_limit_headers(RateHeaders::Always)
    ///     .build()?;
    /// # let _ = palisade;
    /// # Ok::<(), palisade::BuildError>(())
    /// ```
    pub fn rate_limit_headers(mut self, headers: RateHeaders) -> Self {
        self.shield.rate_headers = headers;
        self
    }

    /// `rate_limit.burst`: requests admitted at once after a quiet period.
    pub fn burst(mut self, burst: u32) -> Self {
        self.quota_mut().burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        if burst == 0 {
            self.fail("rate_limit.burst", "must be between 1 and 10000000");
        }
        self
    }

    /// `rate_limit.enabled = false`.
    pub fn no_rate_limit(mut self) -> Self {
        self.shield.limit = None;
        self
    }

    fn fail(&mut self, setting: &str, message: &str) {
        self.error.get_or_insert_with(|| invalid(setting, message));
    }

    fn quota_mut(&mut self) -> &mut Quota {
        &mut self
            .shield
            .limit
            .get_or_insert(LimitPolicy {
                quota: Quota::per_second(NonZeroU32::MIN),
                mode: Mode::Enforce,
            })
            .quota
    }

    /// `[[routes]]`: requests whose path starts with `path_prefix` (on
    /// segment boundaries) get their own per-client limit, labelled `name`.
    /// First match wins. [`limited_route`](Self::limited_route) takes a
    /// period, a key and the other settings a route has in the config file.
    pub fn route(mut self, name: &str, path_prefix: &str, per_second: u32) -> Self {
        if per_second == 0 {
            let i = self.shield.routes.len();
            self.fail(&format!("routes[{i}].rate"), "must be between 1 and 10000000");
        }
        let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        self.limited_route(Route::new(name, path_prefix, Quota::per_second(rate)))
    }

    /// A `[[routes]]` entry with everything the config file can say of its
    /// limit: its period, what it counts by, its headers and the limit of
    /// requests without its key.
    ///
    /// ```
    /// use std::num::NonZeroU32;
    /// use palisade::{LimitKey, Palisade, Period, Quota, RateHeaders, Route};
    ///
    /// let per = |n: u32, p: Period| Quota::per(NonZeroU32::new(n).unwrap(), p);
    /// let palisade = Palisade::builder()
    ///     // 5 login attempts a minute per client.
    ///     .limited_route(Route::new("login", "/login", per(5, Period::Minute)))
    ///     // 1000 a minute per API key, 60 a minute for clients without one.
    ///     .limited_route(
    ///         Route::new("api", "/api", per(1000, Period::Minute))
    ///             .key(LimitKey::Header("x-api-key".parse().unwrap()))
    ///             .anonymous(per(60, Period::Minute))
    ///             .headers(RateHeaders::Always),
    ///     )
    ///     .build()?;
    /// # let _ = palisade;
    /// # Ok::<(), palisade::BuildError>(())
    /// ```
    pub fn limited_route(mut self, route: Route) -> Self {
        self.shield.routes.push(RouteConfig {
            name: route.name,
            matcher: RouteMatch {
                path_prefix: Some(route.path_prefix),
                ..RouteMatch::default()
            },
            limit: Some(LimitPolicy {
                quota: route.quota,
                mode: Mode::Enforce,
            }),
            key: route.key,
            rate_headers: route.headers,
            anonymous: route.anonymous.map(|quota| LimitPolicy {
                quota,
                mode: Mode::Enforce,
            }),
        });
        self
    }

    /// `[reputation]` rules.
    pub fn reputation(mut self, cfg: ReputationConfig) -> Self {
        self.shield.reputation = Some((cfg, Mode::Enforce));
        self.reputation_set = true;
        self
    }

    /// `reputation.enabled = false`.
    pub fn no_reputation(mut self) -> Self {
        self.shield.reputation = None;
        self
    }

    /// `[adaptive_breaker]` rules.
    pub fn adaptive_breaker(mut self, cfg: AdaptiveConfig) -> Self {
        self.shield.adaptive = Some((cfg, Mode::Enforce));
        self
    }

    /// `adaptive_breaker.enabled = false`.
    pub fn no_adaptive_breaker(mut self) -> Self {
        self.shield.adaptive = None;
        self
    }

    /// `[breaker]` rules.
    pub fn breaker(mut self, settings: BreakerSettings) -> Self {
        self.breaker = Some(settings);
        self
    }

    /// `breaker.enabled = false`.
    pub fn no_breaker(mut self) -> Self {
        self.breaker = None;
        self
    }

    /// Every control records what it would have refused
    /// (`mode = "shadow"`) and lets the request through.
    pub fn shadow(mut self) -> Self {
        let s = &mut self.shield;
        let policies = s
            .limit
            .iter_mut()
            .chain(s.routes.iter_mut().filter_map(|r| r.limit.as_mut()));
        for p in policies {
            p.mode = Mode::Shadow;
        }
        for mode in [
            s.reputation.as_mut().map(|r| &mut r.1),
            s.adaptive.as_mut().map(|a| &mut a.1),
        ]
        .into_iter()
        .flatten()
        {
            *mode = Mode::Shadow;
        }
        self
    }

    /// `clients.trusted_proxies` and `clients.client_ip_header`: peers in
    /// `nets` may name the client in that header; nobody else can.
    pub fn trusted_proxies(mut self, nets: impl IntoIterator<Item = IpNet>, header: ClientIpHeader) -> Self {
        self.shield.trusted_proxies =
            TrustedProxies::new(nets.into_iter().map(|n| n.trunc()).collect(), header);
        self
    }

    /// `server.proxy_protocol`: trusted proxies send a PROXY protocol
    /// header on each connection (read within `timeout`); the client it
    /// names is admitted and limited.
    pub fn proxy_protocol(mut self, timeout: Duration) -> Self {
        self.proxy_protocol = Some(timeout);
        self
    }

    /// `clients.allow`: sources outside every control.
    pub fn allow(mut self, net: IpNet) -> Self {
        self.shield.allow.push(net.trunc());
        self
    }

    /// `clients.deny`: sources always refused with 403.
    pub fn deny(mut self, net: IpNet) -> Self {
        self.shield.deny.push(net.trunc());
        self
    }

    /// `[store]`: a reputation snapshot (built with `palisade store build`,
    /// swapped by its feed) consulted before learned reputation: `allow`
    /// entries skip every control, `deny` entries and low scores get 403.
    pub fn store(mut self, store: Arc<StoreCell>) -> Self {
        self.shield.store = Some(store);
        self
    }

    /// `clients.max_tracked`: clients remembered per table (memory is
    /// allocated for them up front, a few hundred bytes each).
    pub fn max_tracked_clients(mut self, n: usize) -> Self {
        self.shield.max_tracked_clients = n;
        self
    }

    /// `clients.ipv6_prefix`: IPv6 clients are grouped by this prefix.
    pub fn ipv6_prefix(mut self, len: u8) -> Self {
        self.shield.ipv6_prefix = len;
        self
    }

    /// `[connections]`: the connection guard's bounds.
    pub fn connections(mut self, cfg: AdmissionConfig) -> Self {
        self.connections = cfg;
        self
    }

    /// Checks the settings and builds the stack.
    pub fn build(self) -> Result<Palisade<C>, BuildError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let s = &self.shield;
        if !(1..=20_000_000).contains(&s.max_tracked_clients) {
            return Err(invalid("clients.max_tracked", "must be between 1 and 20000000"));
        }
        if s.ipv6_prefix > 128 {
            return Err(invalid("clients.ipv6_prefix", "must be between 0 and 128"));
        }
        let quotas = s
            .limit
            .iter()
            .chain(s.routes.iter().flat_map(|r| r.limit.iter().chain(&r.anonymous)));
        for q in quotas.map(|l| l.quota) {
            if [q.rate, q.burst, q.window_limit]
                .iter()
                .any(|n| n.get() > MAX_RATE)
            {
                return Err(invalid(
                    "rate_limit.rate",
                    format!("must be between 1 and {MAX_RATE}"),
                ));
            }
        }
        for (i, r) in s.routes.iter().enumerate() {
            if !r
                .matcher
                .path_prefix
                .as_deref()
                .is_some_and(|p| p.starts_with('/'))
            {
                return Err(invalid(format!("routes[{i}].path_prefix"), "must start with '/'"));
            }
            if r.anonymous.is_some()
                && matches!(r.key, LimitKey::Client | LimitKey::Ip | LimitKey::IpUserAgent)
            {
                return Err(invalid(
                    format!("routes[{i}].anonymous_rate"),
                    "needs a key taken from the request: anonymous requests are those without it",
                ));
            }
            if r.name.is_empty() || r.name == "default" || s.routes[..i].iter().any(|o| o.name == r.name) {
                return Err(invalid(
                    format!("routes[{i}].name"),
                    format!("route name {:?} is empty or already used", r.name),
                ));
            }
        }
        if self.connections.max_connections == 0 || self.connections.max_per_ip == 0 {
            return Err(invalid("connections.max", "must be > 0"));
        }
        Ok(self.assemble())
    }

    fn assemble(self) -> Palisade<C> {
        let admission = Arc::new(Admission::new(
            self.connections,
            self.shield.ipv6_prefix,
            self.shield.max_tracked_clients,
        ));
        let breaker = match self.breaker {
            Some(b) => BreakerLayer::with_clock(b, self.clock.clone()),
            None => BreakerLayer::off(self.clock.clone()),
        };
        Palisade {
            shield: Arc::new(Shield::new(self.shield, self.clock)),
            breaker,
            admission,
            proxy_protocol: self.proxy_protocol,
        }
    }
}
