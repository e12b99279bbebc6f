//! The decision pipeline: who is this client, and may this request pass?
//!
//! Cheapest and most certain checks first: allow list, deny list, reputation,
//! then the rate limit of the matching route. Each control in shadow mode
//! records what it would have done and lets the request through.
//!
//! Nothing here allocates per request once a client is tracked.

use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, Method, Version};
use ipnet::IpNet;
use palisade_core::{ClientKey, Clock, Mode, Nanos, RejectReason, TrustedProxies, unix_now};
use palisade_store::{Action, StoreCell};

use std::num::NonZeroU32;

use palisade_core::NANOS_PER_SEC;

use crate::adaptive::{AdaptiveBreaker, AdaptiveConfig, AdaptiveTransition, Admission, Signal};
use crate::clients::Clients;
use crate::rate::{Headroom, Quota, RateLimited, RateLimiter};
use crate::reputation::{Reputation, ReputationConfig};

/// How a client is identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyBy {
    /// Source address (IPv6 by prefix).
    #[default]
    Ip,
    /// Hash of source address and User-Agent.
    IpUserAgent,
}

/// What the adaptive breaker tells clients apart by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BreakerFingerprint {
    /// Hash of the client key and User-Agent.
    #[default]
    ClientUserAgent,
    /// Hash of the client key and the connection's TLS fingerprint (its
    /// JA4), so a client rotating its User-Agent over one TLS stack keeps
    /// one breaker; without one (plain HTTP), as
    /// [`ClientUserAgent`](Self::ClientUserAgent).
    Ja4,
}

/// What a rate limit counts requests by.
///
/// A key taken from the request (a header, cookie or query parameter) is
/// hashed with the process's seed, so a client's key costs 8 bytes however
/// long it sent it. Such a limit sits beside the per-client default limit,
/// never in its place: a client that sends a new API key with every
/// request gets a fresh bucket each time, so its requests are also charged
/// to its address on the default limiter. A request without the key is
/// counted by its address alone.
#[derive(Debug, Clone, Default)]
pub enum LimitKey {
    /// The client, as [`ShieldConfig::key_by`] identifies it.
    #[default]
    Client,
    /// Source address (IPv6 by prefix).
    Ip,
    /// Hash of source address and User-Agent.
    IpUserAgent,
    /// A request header's value (`header:X-API-Key`).
    Header(http::HeaderName),
    /// A cookie's value (`cookie:session`).
    Cookie(String),
    /// A query parameter's value, percent-decoded as applications read it
    /// (`query:token`).
    Query(String),
    /// The connection's TLS fingerprint, [`RequestFacts::tls_fingerprint`]
    /// (`ja4`): every client with one TLS stack shares the limit.
    Ja4,
    /// Whatever a [`KeyExtractor`] of the caller's takes from the request.
    Custom(Arc<dyn KeyExtractor>),
}

impl PartialEq for LimitKey {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Client, Self::Client)
            | (Self::Ip, Self::Ip)
            | (Self::IpUserAgent, Self::IpUserAgent)
            | (Self::Ja4, Self::Ja4) => true,
            (Self::Header(a), Self::Header(b)) => a == b,
            (Self::Cookie(a), Self::Cookie(b)) | (Self::Query(a), Self::Query(b)) => a == b,
            // Two extractors are the same key only if they are one object:
            // two closures that happen to agree cannot be told apart.
            (Self::Custom(a), Self::Custom(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for LimitKey {}

/// Takes a rate-limit key from a request: a tenant id, a signed token's
/// subject, a header pair, anything [`RequestFacts`] holds.
///
/// The bytes it returns are hashed with the process's seed, so a client that
/// chooses them cannot aim at one slot of the table, and a long key costs 8
/// bytes. `None` (or empty bytes) counts the request by the client's address
/// alone. As with a header key, a keyed request is also charged to its
/// address on the default limit, so minting a new key per request buys a
/// client nothing.
///
/// ```
/// use std::borrow::Cow;
/// use std::sync::Arc;
/// use palisade_limits::shield::{KeyExtractor, LimitKey, RequestFacts};
///
/// /// Counts by tenant: the first path segment of `/t/{tenant}/...`.
/// #[derive(Debug)]
/// struct Tenant;
///
/// impl KeyExtractor for Tenant {
///     fn key<'r>(&self, req: &RequestFacts<'r>) -> Option<Cow<'r, [u8]>> {
///         let rest = req.path.strip_prefix("/t/")?;
///         let tenant = rest.split('/').next()?;
///         Some(Cow::Borrowed(tenant.as_bytes()))
///     }
/// }
///
/// let key = LimitKey::Custom(Arc::new(Tenant));
/// # let _ = key;
/// ```
pub trait KeyExtractor: std::fmt::Debug + Send + Sync + 'static {
    /// The key's bytes, borrowed from the request where they can be.
    fn key<'r>(&self, req: &RequestFacts<'r>) -> Option<Cow<'r, [u8]>>;
}

/// Which responses carry the `RateLimit` and `RateLimit-Policy` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RateHeaders {
    /// Only refusals (429).
    #[default]
    Refused,
    /// Every response to a request a limit counted, saying what is left.
    Always,
}

/// A rate limit and whether it is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitPolicy {
    /// The per-client quota.
    pub quota: Quota,
    /// Enforce or shadow.
    pub mode: Mode,
}

/// Which requests a route covers. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// Path prefix, matched on segment boundaries (`/api` covers `/api` and
    /// `/api/x`, not `/apix`).
    pub path_prefix: Option<String>,
    /// Methods covered.
    pub methods: Vec<Method>,
    /// Host (without port), compared case-insensitively.
    pub host: Option<String>,
    /// Whether `path_prefix` is compared case-sensitively. Off by default:
    /// a backend that serves `/Login` as `/login` must not let `/Login`
    /// slip past the route's limit; a case-sensitive backend only loses
    /// the difference between two spellings it answers 404 to anyway.
    pub case_sensitive: bool,
}

/// A named route with its own limit (or the default one).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Label in metrics and logs.
    pub name: String,
    /// What it covers.
    pub matcher: RouteMatch,
    /// Its own limit; `None` shares the default limiter.
    pub limit: Option<LimitPolicy>,
    /// What its own limit counts by (without one, the default's key).
    pub key: LimitKey,
    /// Which of its responses say what is left of the limit; `None`
    /// follows [`ShieldConfig::rate_headers`].
    pub rate_headers: Option<RateHeaders>,
    /// With a `key` taken from the request: the limit of the requests that
    /// do not carry it, counted by client, so anonymous clients get one
    /// limit and keyed ones another. `None`: they count against `limit`.
    pub anonymous: Option<LimitPolicy>,
}

/// Everything the shield needs, already validated.
#[derive(Debug, Clone)]
pub struct ShieldConfig {
    /// Client identity.
    pub key_by: KeyBy,
    /// IPv6 prefix length that makes one client.
    pub ipv6_prefix: u8,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: TrustedProxies,
    /// Sources that skip every control.
    pub allow: Vec<IpNet>,
    /// Sources always refused with 403.
    pub deny: Vec<IpNet>,
    /// Bound on tracked clients, per table.
    pub max_tracked_clients: usize,
    /// Default per-client limit; `None` disables rate limiting.
    pub limit: Option<LimitPolicy>,
    /// What the default limit counts by.
    pub limit_key: LimitKey,
    /// Which responses say what is left of the limit (routes may differ).
    pub rate_headers: RateHeaders,
    /// Routes, first match wins.
    pub routes: Vec<RouteConfig>,
    /// Reputation rules; `None` disables reputation.
    pub reputation: Option<(ReputationConfig, Mode)>,
    /// Adaptive per-fingerprint breaker; `None` disables it.
    pub adaptive: Option<(AdaptiveConfig, Mode)>,
    /// What the adaptive breaker's fingerprint is made of.
    pub breaker_fingerprint: BreakerFingerprint,
    /// External reputation: allow, deny and scores from a snapshot.
    /// Shared across reloads, swapped by its feed.
    pub store: Option<Arc<StoreCell>>,
}

impl Default for ShieldConfig {
    fn default() -> Self {
        let rate = std::num::NonZeroU32::new(100).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            key_by: KeyBy::Ip,
            ipv6_prefix: 64,
            trusted_proxies: TrustedProxies::default(),
            allow: Vec::new(),
            deny: Vec::new(),
            max_tracked_clients: 100_000,
            limit: Some(LimitPolicy {
                quota: Quota::per_second(rate),
                mode: Mode::Enforce,
            }),
            limit_key: LimitKey::Client,
            rate_headers: RateHeaders::Refused,
            routes: Vec::new(),
            reputation: Some((ReputationConfig::default(), Mode::Enforce)),
            adaptive: Some((AdaptiveConfig::default(), Mode::Enforce)),
            breaker_fingerprint: BreakerFingerprint::ClientUserAgent,
            store: None,
        }
    }
}

/// The facts about a request that decisions use.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// TCP peer address.
    pub peer: IpAddr,
    /// Request method.
    pub method: &'a Method,
    /// Host header or URI authority, port included or not.
    pub host: Option<&'a str>,
    /// Request path.
    pub path: &'a str,
    /// The target as forwarded (path and query), for the caller's logs;
    /// no decision reads it.
    pub target: &'a str,
    /// HTTP version, for the caller's logs.
    pub version: Version,
    /// Request headers (forwarding headers, User-Agent).
    pub headers: &'a HeaderMap,
    /// The connection's TLS fingerprint (its JA4), when the server
    /// terminating TLS computed one; `None` on plain HTTP.
    pub tls_fingerprint: Option<&'a str>,
}

/// Index of the route a request matched; 0 is the default route.
pub type RouteId = usize;

/// A refusal to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// Why.
    pub reason: RejectReason,
    /// Seconds until a retry can succeed (rate limits only).
    pub retry_after_secs: Option<u64>,
    /// The quota that refused (rate limits only), for `RateLimit-Policy`.
    pub quota: Option<Quota>,
}

/// The outcome for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The resolved client address.
    pub client_ip: IpAddr,
    /// The key the client is charged to.
    pub key: ClientKey,
    /// The route matched.
    pub route: RouteId,
    /// `Some` when the request must be refused.
    pub rejection: Option<Rejection>,
    /// What a control in shadow mode would have refused.
    pub would_block: Option<RejectReason>,
    /// This request crossed the flood threshold: a reputation penalty was applied.
    pub flooded: bool,
    /// The adaptive breaker's key: hash of address key and User-Agent.
    pub fingerprint: ClientKey,
    /// An adaptive breaker state change this request caused.
    pub transition: Option<AdaptiveTransition>,
    /// Request start on the shield's clock (for time to first byte).
    pub started: Nanos,
    /// Allow-listed (config or store): outside every control.
    pub exempt: bool,
    /// What is left of the limit, when the route's responses say it
    /// ([`RateHeaders::Always`]) and the request was admitted.
    pub allowance: Option<Allowance>,
}

/// What an admitted request left of the tightest limit it was counted
/// against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// Whose limiter: 0 is the default one, `n` route `n`'s own (its
    /// name: [`Shield::route_name`]).
    pub limiter: RouteId,
    /// Its quota.
    pub quota: Quota,
    /// What is left of it.
    pub headroom: Headroom,
}

/// What a response changed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ResponseEffects {
    /// A reputation penalty (error streak) was applied.
    pub penalized: bool,
    /// The adaptive breaker changed state.
    pub transition: Option<AdaptiveTransition>,
}

struct Route {
    config: RouteConfig,
    limiter: Option<(RateLimiter, Mode)>,
    /// The limiter of requests without the route's key, and its name
    /// among the limiters (`api:anonymous`: no route can be named so).
    anonymous: Option<((RateLimiter, Mode), String)>,
}

/// The decision pipeline, shared by every connection.
pub struct Shield<C> {
    clock: C,
    cfg: ShieldConfig,
    fingerprint_hasher: foldhash::fast::RandomState,
    default_limiter: Option<(RateLimiter, Mode)>,
    routes: Vec<Route>,
    reputation: Option<(Reputation, Mode)>,
    adaptive: Option<(AdaptiveBreaker, Mode)>,
    /// Unix seconds at clock time 0: store entries expire in wall time.
    unix_origin: u64,
    /// Some limit counts by a header, cookie or query parameter.
    keyed_by_request: bool,
}

impl<C: Clock> Shield<C> {
    /// Builds the pipeline. Cannot fail: the config is already validated.
    pub fn new(cfg: ShieldConfig, clock: C) -> Self {
        Self::carrying_over(cfg, clock, None)
    }

    /// Builds the pipeline for a reloaded config, keeping the state of
    /// `previous`: scores, and the limiter state of every route that keeps
    /// its name (new limits apply to it). Tables are sized at start, so a
    /// changed `max_tracked_clients` starts them afresh.
    pub fn carrying_over(cfg: ShieldConfig, clock: C, previous: Option<&Shield<C>>) -> Self {
        let previous = previous.filter(|p| p.cfg.max_tracked_clients == cfg.max_tracked_clients);
        // The default limiter and reputation keep their clients in one
        // table: their fields are disjoint parts of one record, so a
        // decision finds and locks each client once for both.
        let shared = std::cell::OnceCell::new();
        let clients = || {
            Arc::clone(shared.get_or_init(|| {
                previous
                    .and_then(Shield::clients)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Clients::new(cfg.max_tracked_clients)))
            }))
        };
        let route_limiter = |name: &str, p: &LimitPolicy| {
            let old = previous.and_then(|prev| prev.limiters().find(|(n, _)| *n == name));
            let limiter = match old {
                Some((_, l)) => RateLimiter::with_table(p.quota, l.table().clone()),
                None => RateLimiter::new(p.quota, cfg.max_tracked_clients),
            };
            (limiter, p.mode)
        };
        Self {
            default_limiter: cfg
                .limit
                .as_ref()
                .map(|p| (RateLimiter::with_table(p.quota, clients()), p.mode)),
            routes: cfg
                .routes
                .iter()
                .map(|r| Route {
                    config: r.clone(),
                    limiter: r.limit.as_ref().map(|p| route_limiter(&r.name, p)),
                    anonymous: r.anonymous.as_ref().map(|p| {
                        let name = format!("{}:anonymous", r.name);
                        (route_limiter(&name, p), name)
                    }),
                })
                .collect(),
            reputation: cfg.reputation.as_ref().map(|(rc, mode)| {
                let rep = match previous.and_then(Shield::reputation) {
                    // Its table is the previous shield's shared one.
                    Some(old) => Reputation::carrying_over(rc.clone(), old),
                    None => Reputation::with_table(rc.clone(), clients()),
                };
                (rep, *mode)
            }),
            adaptive: cfg.adaptive.as_ref().map(|(ac, mode)| {
                let breaker = match previous.and_then(Shield::adaptive) {
                    Some(old) => AdaptiveBreaker::carrying_over(ac.clone(), old),
                    None => AdaptiveBreaker::new(ac.clone(), cfg.max_tracked_clients),
                };
                (breaker, *mode)
            }),
            // Fingerprint keys must not change under a reload.
            fingerprint_hasher: previous.map_or_else(Default::default, |p| p.fingerprint_hasher.clone()),
            unix_origin: unix_now().saturating_sub(clock.now() / NANOS_PER_SEC),
            keyed_by_request: std::iter::once(&cfg.limit_key)
                .chain(cfg.routes.iter().map(|r| &r.key))
                .any(|k| matches!(k, LimitKey::Header(_) | LimitKey::Cookie(_) | LimitKey::Query(_))),
            clock,
            cfg,
        }
    }

    /// The clock decisions are made with.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The config this shield was built from.
    pub fn config(&self) -> &ShieldConfig {
        &self.cfg
    }

    /// Route names, indexed by [`RouteId`]; 0 is `"default"`.
    pub fn route_name(&self, id: RouteId) -> &str {
        match id {
            0 => "default",
            n => self
                .routes
                .get(n - 1)
                .map_or("default", |r| r.config.name.as_str()),
        }
    }

    /// Number of routes, the default one included.
    pub fn route_count(&self) -> usize {
        self.routes.len() + 1
    }

    /// The reputation engine, when enabled.
    pub fn reputation(&self) -> Option<&Reputation> {
        self.reputation.as_ref().map(|(r, _)| r)
    }

    /// The table the default limiter and reputation keep their clients
    /// in, when either is enabled.
    pub fn clients(&self) -> Option<&Arc<Clients>> {
        self.reputation
            .as_ref()
            .map(|(r, _)| r.table())
            .or_else(|| self.default_limiter.as_ref().map(|(l, _)| l.table()))
    }

    /// The adaptive breaker, when enabled.
    pub fn adaptive(&self) -> Option<&AdaptiveBreaker> {
        self.adaptive.as_ref().map(|(a, _)| a)
    }

    /// Every limiter: the default one, then one per route with its own
    /// limit, and one more (`name:anonymous`) per route with a limit for
    /// requests without its key.
    pub fn limiters(&self) -> impl Iterator<Item = (&str, &RateLimiter)> {
        let default = self.default_limiter.as_ref().map(|(l, _)| ("default", l));
        default.into_iter().chain(self.routes.iter().flat_map(|r| {
            let own = r.limiter.as_ref().map(|(l, _)| (r.config.name.as_str(), l));
            let anonymous = r.anonymous.as_ref().map(|((l, _), name)| (name.as_str(), l));
            own.into_iter().chain(anonymous)
        }))
    }

    /// The client key for an address (admin lookups).
    pub fn key_for_ip(&self, ip: IpAddr) -> ClientKey {
        ClientKey::from_ip(ip, self.cfg.ipv6_prefix)
    }

    /// Decides one request.
    pub fn decide(&self, req: &RequestFacts<'_>) -> Decision {
        self.decide_with(req, |_| false)
    }

    /// [`decide`](Self::decide) with an outside ban list (the kernel
    /// defense's) asked about the resolved client right after the allow
    /// list. The order is cheapest and most certain first, and nothing is
    /// charged for a request that a list already refuses: allow list, outside
    /// bans, deny list, reputation store, learned reputation, rate limit,
    /// adaptive breaker.
    pub fn decide_with(&self, req: &RequestFacts<'_>, banned: impl FnOnce(IpAddr) -> bool) -> Decision {
        let now = self.clock.now();
        let client_ip = self.cfg.trusted_proxies.client_ip(req.peer, req.headers);
        let ua = req
            .headers
            .get(http::header::USER_AGENT)
            .map_or(&[][..], |v| v.as_bytes());
        let by_user_agent = if self.adaptive.is_some() || self.cfg.key_by == KeyBy::IpUserAgent {
            ClientKey::fingerprint(client_ip, self.cfg.ipv6_prefix, ua, &self.fingerprint_hasher)
        } else {
            ClientKey::Fingerprint(0)
        };
        let key = match self.cfg.key_by {
            KeyBy::Ip => ClientKey::from_ip(client_ip, self.cfg.ipv6_prefix),
            KeyBy::IpUserAgent => by_user_agent,
        };
        // Behind a trusted proxy the connection's ClientHello is the
        // proxy's: counted by it, every client behind one hop would share
        // one limit and one breaker.
        let tls_fingerprint = req
            .tls_fingerprint
            .filter(|_| client_ip == req.peer.to_canonical());
        let fingerprint = match tls_fingerprint {
            Some(ja4) if self.adaptive.is_some() => self.breaker_key(client_ip, ja4).unwrap_or(by_user_agent),
            _ => by_user_agent,
        };
        let route = self.route_for(req);
        let route_limiter = self.limiter_for(route);
        let route_limiter_id = if self.has_own_limit(route) { route } else { 0 };
        let headers = self.rate_headers_for(route) == RateHeaders::Always;
        // A limit keyed by the request is checked beside the default one,
        // charged to the client; any other is checked alone, by its key.
        let (limiter, limit_key, keyed) = match self.limit_key_for(route) {
            LimitKey::Client => (route_limiter, key, None),
            LimitKey::Ip => (
                route_limiter,
                ClientKey::from_ip(client_ip, self.cfg.ipv6_prefix),
                None,
            ),
            LimitKey::IpUserAgent => (
                route_limiter,
                ClientKey::fingerprint(client_ip, self.cfg.ipv6_prefix, ua, &self.fingerprint_hasher),
                None,
            ),
            by => match self.request_key(by, req, tls_fingerprint) {
                Some(k) => (self.default_limiter.as_ref(), key, route_limiter.map(|l| (l, k))),
                None => (self.anonymous_limiter_for(route).or(route_limiter), key, None),
            },
        };
        // Which limiter each check is: the request-keyed one is the route's.
        let limiter_id = if keyed.is_some() { 0 } else { route_limiter_id };
        // Reputation and the limiter in the same record (the default
        // limiter's): one lookup serves both.
        let together = match (&self.reputation, limiter) {
            (Some((rep, _)), Some((l, _))) => Arc::ptr_eq(rep.table(), l.table()) && limit_key == key,
            _ => false,
        };
        // Up to three tables are consulted below: start all their loads now.
        if let Some((rep, _)) = &self.reputation {
            rep.table().prefetch(&key);
        }
        if let Some((l, _)) = limiter
            && !together
        {
            l.table().prefetch(&limit_key);
        }
        if let Some((adaptive, _)) = &self.adaptive {
            adaptive.table().prefetch(&fingerprint);
        }
        let mut decision = Decision {
            client_ip,
            key,
            route,
            rejection: None,
            would_block: None,
            flooded: false,
            fingerprint,
            transition: None,
            started: now,
            exempt: false,
            allowance: None,
        };
        if self.cfg.allow.iter().any(|n| n.contains(&client_ip)) {
            decision.exempt = true;
            return decision;
        }
        if banned(client_ip) || self.cfg.deny.iter().any(|n| n.contains(&client_ip)) {
            decision.rejection = Some(Rejection {
                reason: RejectReason::Denylisted,
                retry_after_secs: None,
                quota: None,
            });
            return decision;
        }
        if let Some(store) = &self.cfg.store
            && let Some(verdict) = store.lookup(client_ip, self.unix_origin + now / NANOS_PER_SEC)
        {
            let (mode, block_below) = match &self.reputation {
                Some((rep, mode)) => (*mode, rep.config().block_below),
                None => (Mode::Enforce, ReputationConfig::default().block_below),
            };
            let reason = match verdict.action {
                Action::Allow => {
                    decision.exempt = true;
                    return decision;
                }
                Action::Deny => Some(RejectReason::Denylisted),
                Action::Score if verdict.score < block_below => Some(RejectReason::Reputation),
                Action::Score => None,
            };
            if let Some(reason) = reason {
                let rejection = Rejection {
                    reason,
                    retry_after_secs: None,
                    quota: None,
                };
                if decision.apply(rejection, mode) {
                    return decision;
                }
            }
        }
        // The limiter's verdict when it was reached in reputation's lookup.
        let mut checked = None;
        if let Some((rep, mode)) = &self.reputation {
            let standing = match limiter {
                Some((l, _)) if together => {
                    let (standing, limited) = rep.table().with(&key, now, |w, place| {
                        let standing = rep.observe_in(&key, w, place, now);
                        // An enforced reputation refusal charges no rate limit.
                        let refused = standing.blocked && *mode == Mode::Enforce;
                        (standing, (!refused).then(|| counted(w, l.quota(), now, headers)))
                    });
                    checked = limited;
                    standing
                }
                _ => rep.observe_request(&key, now),
            };
            decision.flooded = standing.flooded;
            if standing.blocked {
                let rejection = Rejection {
                    reason: RejectReason::Reputation,
                    retry_after_secs: None,
                    quota: None,
                };
                if decision.apply(rejection, *mode) {
                    return decision;
                }
            }
        }
        let checks = limiter
            .map(|l| {
                let verdict = checked.unwrap_or_else(|| {
                    l.0.table()
                        .with(&limit_key, now, |w, _| counted(w, l.0.quota(), now, headers))
                });
                (limiter_id, l, verdict)
            })
            .into_iter()
            .chain(keyed.map(|(l, k)| {
                let verdict =
                    l.0.table()
                        .with(&k, now, |w, _| counted(w, l.0.quota(), now, headers));
                (route_limiter_id, l, verdict)
            }));
        for (id, (limiter, mode), verdict) in checks {
            match verdict {
                Ok(Some(headroom)) => {
                    let tighter = decision
                        .allowance
                        .is_none_or(|a| headroom.remaining < a.headroom.remaining);
                    if tighter {
                        decision.allowance = Some(Allowance {
                            limiter: id,
                            quota: *limiter.quota(),
                            headroom,
                        });
                    }
                }
                Ok(None) => {}
                Err(limited) => {
                    let rejection = Rejection {
                        reason: RejectReason::RateLimited,
                        retry_after_secs: Some(limited.retry_after_secs()),
                        quota: Some(*limiter.quota()),
                    };
                    if decision.apply(rejection, *mode) {
                        decision.allowance = None;
                        return decision;
                    }
                }
            }
        }
        let limiter = route_limiter;
        if let Some((adaptive, mode)) = &self.adaptive {
            let quota = limiter.map_or_else(|| Quota::per_second(NonZeroU32::MAX), |(l, _)| *l.quota());
            let (admission, transition) = adaptive.admit(&fingerprint, client_ip, &quota, now);
            decision.transition = transition;
            let rejection = match admission {
                Admission::Pass => None,
                Admission::Limited { retry_after, quota } => Some(Rejection {
                    reason: RejectReason::RateLimited,
                    retry_after_secs: Some(retry_after.div_ceil(NANOS_PER_SEC).max(1)),
                    quota: Some(quota),
                }),
                Admission::Refused { retry_after } => Some(Rejection {
                    reason: RejectReason::ClientBreakerOpen,
                    retry_after_secs: Some(retry_after.div_ceil(NANOS_PER_SEC).max(1)),
                    quota: None,
                }),
            };
            if let Some(r) = rejection
                && decision.apply(r, *mode)
            {
                decision.allowance = None;
            }
        }
        decision
    }

    /// Feeds a forwarded request's outcome back: the status to reputation
    /// (400/401 streaks) and, with the time to first byte, to the adaptive
    /// breaker.
    pub fn observe_response(&self, decision: &Decision, status: u16) -> ResponseEffects {
        // Nothing listens (a rate limit alone): not even the clock is read.
        if self.reputation.is_none() && self.adaptive.is_none() {
            return ResponseEffects::default();
        }
        // Allow-listed clients are outside every control.
        if self.cfg.allow.iter().any(|n| n.contains(&decision.client_ip)) {
            return ResponseEffects::default();
        }
        let now = self.clock.now();
        let penalized = self
            .reputation
            .as_ref()
            .is_some_and(|(rep, _)| rep.observe_response(&decision.key, status, now));
        let transition = self.adaptive.as_ref().and_then(|(adaptive, _)| {
            let signal = if status >= 500 {
                Signal::ServerError
            } else if now.saturating_sub(decision.started) > adaptive.config().slow_first_byte {
                Signal::SlowFirstByte
            } else {
                Signal::Success
            };
            adaptive.record(&decision.fingerprint, decision.client_ip, signal, now)
        });
        ResponseEffects {
            penalized,
            transition,
        }
    }

    /// A connection from `peer` failed before a request could be made of it
    /// (TLS handshake timeout, unparseable request head). There is no
    /// User-Agent, so it counts against the fingerprint with an empty one,
    /// or, when the breaker goes by JA4 and the ClientHello gave one
    /// (`tls_fingerprint`), against that.
    pub fn observe_connection_failure(
        &self,
        peer: IpAddr,
        signal: Signal,
        tls_fingerprint: Option<&str>,
    ) -> Option<AdaptiveTransition> {
        let (adaptive, _) = self.adaptive.as_ref()?;
        let ip = peer.to_canonical();
        if self.cfg.allow.iter().any(|n| n.contains(&ip)) {
            return None;
        }
        let fingerprint = tls_fingerprint
            .and_then(|ja4| self.breaker_key(ip, ja4))
            .unwrap_or_else(|| {
                ClientKey::fingerprint(ip, self.cfg.ipv6_prefix, b"", &self.fingerprint_hasher)
            });
        adaptive.record(&fingerprint, ip, signal, self.clock.now())
    }

    /// The breaker's fingerprint of a client on a TLS connection with this
    /// JA4, when the breaker goes by JA4.
    fn breaker_key(&self, client_ip: IpAddr, ja4: &str) -> Option<ClientKey> {
        if self.cfg.breaker_fingerprint != BreakerFingerprint::Ja4 {
            return None;
        }
        let mut h = self.fingerprint_hasher.build_hasher();
        // Tagged, so no User-Agent spells the same fingerprint.
        h.write_u8(b'j');
        std::hash::Hash::hash(&ClientKey::from_ip(client_ip, self.cfg.ipv6_prefix), &mut h);
        h.write(ja4.as_bytes());
        Some(ClientKey::Fingerprint(h.finish()))
    }

    /// Current time on the shield's clock.
    pub fn now(&self) -> Nanos {
        self.clock.now()
    }

    fn route_for(&self, req: &RequestFacts<'_>) -> RouteId {
        self.routes
            .iter()
            .position(|r| r.config.matcher.matches(req))
            .map_or(0, |i| i + 1)
    }

    /// The limit a route's requests are counted against: the name of the
    /// limiter (`default`, or the route's own), its quota and mode.
    pub fn limit_for(&self, route: RouteId) -> Option<(&str, Quota, Mode)> {
        let own = route
            .checked_sub(1)
            .and_then(|i| self.routes.get(i))
            .filter(|r| r.limiter.is_some());
        let name = own.map_or("default", |r| r.config.name.as_str());
        self.limiter_for(route).map(|(l, mode)| (name, *l.quota(), *mode))
    }

    /// The limiter of a route's requests without its key, when it has one.
    fn anonymous_limiter_for(&self, route: RouteId) -> Option<&(RateLimiter, Mode)> {
        let r = route.checked_sub(1).and_then(|i| self.routes.get(i))?;
        r.anonymous.as_ref().map(|(limiter, _)| limiter)
    }

    /// Whether a route has a limiter of its own.
    fn has_own_limit(&self, route: RouteId) -> bool {
        route
            .checked_sub(1)
            .and_then(|i| self.routes.get(i))
            .is_some_and(|r| r.limiter.is_some())
    }

    /// Which of a route's responses say what is left of its limit.
    pub fn rate_headers_for(&self, route: RouteId) -> RateHeaders {
        route
            .checked_sub(1)
            .and_then(|i| self.routes.get(i))
            .and_then(|r| r.config.rate_headers)
            .unwrap_or(self.cfg.rate_headers)
    }

    /// Whether the request carries the key its limit counts by more than
    /// once: two header lines, two cookies or two query parameters of the
    /// name. Such a request is refused (400) by the layers that call this,
    /// since a limit could count one copy while the application reads
    /// another (a fresh value first, the real key after, would dodge the
    /// key's limit). Costs nothing when no limit is keyed by the request.
    pub fn sends_key_twice(&self, req: &RequestFacts<'_>) -> bool {
        if !self.keyed_by_request {
            return false;
        }
        match self.limit_key_for(self.route_for(req)) {
            LimitKey::Header(name) => req.headers.get_all(name).iter().nth(1).is_some(),
            LimitKey::Cookie(name) => cookies(req.headers, name).nth(1).is_some(),
            LimitKey::Query(name) => query_params(req.target, name).nth(1).is_some(),
            _ => false,
        }
    }

    /// What the limit a route's requests count against is keyed by.
    fn limit_key_for(&self, route: RouteId) -> &LimitKey {
        route
            .checked_sub(1)
            .and_then(|i| self.routes.get(i))
            .filter(|r| r.limiter.is_some())
            .map_or(&self.cfg.limit_key, |r| &r.config.key)
    }

    /// The seeded hash of a header, cookie or query parameter's value (or
    /// the client's own TLS fingerprint, `ja4`); `None` when the request has
    /// none (or an empty one).
    fn request_key(&self, by: &LimitKey, req: &RequestFacts<'_>, ja4: Option<&str>) -> Option<ClientKey> {
        let (tag, value): (u8, Cow<'_, [u8]>) = match by {
            LimitKey::Client | LimitKey::Ip | LimitKey::IpUserAgent => return None,
            LimitKey::Header(name) => (1, Cow::Borrowed(req.headers.get(name)?.as_bytes())),
            LimitKey::Cookie(name) => (2, cookies(req.headers, name).next()?),
            LimitKey::Query(name) => (3, query_params(req.target, name).next()?),
            LimitKey::Custom(extractor) => (4, extractor.key(req)?),
            LimitKey::Ja4 => (5, Cow::Borrowed(ja4?.as_bytes())),
        };
        if value.is_empty() {
            return None;
        }
        let mut h = self.fingerprint_hasher.build_hasher();
        h.write_u8(tag);
        h.write(&value);
        Some(ClientKey::Fingerprint(h.finish()))
    }

    fn limiter_for(&self, route: RouteId) -> Option<&(RateLimiter, Mode)> {
        match route {
            0 => self.default_limiter.as_ref(),
            n => self
                .routes
                .get(n - 1)
                .and_then(|r| r.limiter.as_ref())
                .or(self.default_limiter.as_ref()),
        }
    }
}

/// One request counted against a client's record; what it leaves is only
/// worked out when a response will say it.
#[inline]
fn counted(
    w: &mut crate::record::Words,
    quota: &Quota,
    now: Nanos,
    headroom: bool,
) -> Result<Option<Headroom>, RateLimited> {
    if headroom {
        w.admit(quota, now).map(Some)
    } else {
        w.check(quota, now).map(|()| None)
    }
}

impl Decision {
    /// Records a rejection under `mode`; returns true when it is enforced.
    /// Records a refusal: enforced (returns true) or, in shadow mode, only
    /// noted in `would_block` (returns false).
    pub fn apply(&mut self, rejection: Rejection, mode: Mode) -> bool {
        match mode {
            Mode::Enforce => {
                self.rejection = Some(rejection);
                true
            }
            Mode::Shadow => {
                self.would_block.get_or_insert(rejection.reason);
                false
            }
        }
    }
}

impl RouteMatch {
    fn matches(&self, req: &RequestFacts<'_>) -> bool {
        if !self.methods.is_empty() && !self.methods.contains(req.method) {
            return false;
        }
        if let Some(host) = &self.host {
            let Some(req_host) = req.host else {
                return false;
            };
            let req_host = strip_port(req_host);
            if !req_host.eq_ignore_ascii_case(host) {
                return false;
            }
        }
        match &self.path_prefix {
            None => true,
            Some(prefix) => {
                let rest = if self.case_sensitive {
                    req.path.strip_prefix(prefix.as_str())
                } else {
                    req.path
                        .get(..prefix.len())
                        .filter(|head| head.eq_ignore_ascii_case(prefix))
                        .and_then(|_| req.path.get(prefix.len()..))
                };
                match rest {
                    Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
                    None => false,
                }
            }
        }
    }
}

/// The values of cookie `name` in the request's `Cookie` headers, name and
/// value percent-decoded and the value unquoted, as most frameworks read
/// them.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = Cow<'a, [u8]>> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(move |pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (percent_decoded(pair[..eq].trim_ascii(), false) == name.as_bytes()).then(|| {
                let value = pair[eq + 1..].trim_ascii();
                // RFC 6265 allows a quoted value, which Go and Python unquote.
                let value = value
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(value);
                percent_decoded(value, false)
            })
        })
}

/// The values of query parameter `name` in `target`, decoded as the
/// application reads them (`%61bc` and `abc` are one key, `+` a space),
/// names compared decoded too.
fn query_params<'a>(target: &'a str, name: &'a str) -> impl Iterator<Item = Cow<'a, [u8]>> {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(move |pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decoded(k.as_bytes(), true) == name.as_bytes())
                .then(|| percent_decoded(v.as_bytes(), true))
        })
}

/// `%XX` decoded (and `+` as a space for query strings); a `%` not
/// followed by two hex digits is kept as it is, as lenient decoders do.
fn percent_decoded(raw: &[u8], plus_is_space: bool) -> Cow<'_, [u8]> {
    if !raw.iter().any(|&b| b == b'%' || (plus_is_space && b == b'+')) {
        return Cow::Borrowed(raw);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'%' => match (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)] // tests read better as "default, but ..."
mod tests {
    use super::*;
    use palisade_core::{ClientIpHeader, ManualClock};
    use std::num::NonZeroU32;

    fn quota(rate: u32) -> Quota {
        Quota::per_second(NonZeroU32::new(rate).unwrap())
    }

    fn facts<'a>(peer: &str, path: &'a str, method: &'a Method, headers: &'a HeaderMap) -> RequestFacts<'a> {
        RequestFacts {
            peer: peer.parse().unwrap(),
            method,
            host: Some("example.com:8080"),
            path,
            target: path,
            version: Version::HTTP_11,
            headers,
            tls_fingerprint: None,
        }
    }

    fn run(shield: &Shield<ManualClock>, peer: &str, path: &str, n: usize) -> (usize, Vec<Decision>) {
        let h = HeaderMap::new();
        let m = Method::GET;
        let ds: Vec<_> = (0..n)
            .map(|_| shield.decide(&facts(peer, path, &m, &h)))
            .collect();
        (ds.iter().filter(|d| d.rejection.is_none()).count(), ds)
    }

    #[test]
    fn store_entries_allow_deny_and_score() {
        let csv = "192.0.2.1,0,abuse,deny\n192.0.2.2,10,spam\n192.0.2.3,90,partner,allow\n192.0.2.4,80\n";
        let snap = palisade_store::Builder::from_csv(csv.as_bytes(), "t")
            .unwrap()
            .finish(palisade_store::BuildOptions::default())
            .unwrap();
        let mut cfg = ShieldConfig::default();
        cfg.store = Some(Arc::new(StoreCell::new(snap, None)));
        let s = Shield::new(cfg, ManualClock::new());
        let reason = |ip| run(&s, ip, "/", 1).1[0].rejection.map(|r| r.reason);
        assert_eq!(reason("192.0.2.1"), Some(RejectReason::Denylisted));
        assert_eq!(reason("192.0.2.2"), Some(RejectReason::Reputation));
        assert_eq!(reason("192.0.2.4"), None);
        assert_eq!(reason("198.51.100.1"), None);
        // Allowed by the store: past the rate limit too.
        assert_eq!(run(&s, "192.0.2.3", "/", 300).0, 300);
        assert_eq!(
            run(&s, "192.0.2.4", "/", 300).0,
            99,
            "a listed score above the threshold is still limited"
        );
    }

    #[test]
    fn default_limit_is_100_per_client() {
        let s = Shield::new(ShieldConfig::default(), ManualClock::new());
        let (ok, ds) = run(&s, "127.0.0.2", "/", 150);
        assert_eq!(ok, 100);
        let r = ds[149].rejection.unwrap();
        assert_eq!(r.reason, RejectReason::RateLimited);
        assert_eq!(r.retry_after_secs, Some(1));
        // Another client is untouched.
        assert_eq!(run(&s, "127.0.0.3", "/", 10).0, 10);
    }

    #[test]
    fn an_outside_ban_refuses_before_anything_is_charged() {
        let mut cfg = ShieldConfig::default();
        cfg.limit = Some(LimitPolicy {
            quota: quota(5),
            mode: Mode::Enforce,
        });
        let s = Shield::new(cfg, ManualClock::new());
        let (m, h) = (Method::GET, HeaderMap::new());
        for _ in 0..20 {
            let d = s.decide_with(&facts("127.0.0.2", "/", &m, &h), |_| true);
            assert_eq!(d.rejection.map(|r| r.reason), Some(RejectReason::Denylisted));
        }
        // The ban lifted, the client's bucket is whole.
        assert_eq!(run(&s, "127.0.0.2", "/", 10).0, 5);
    }

    #[test]
    fn shadow_mode_counts_but_passes() {
        let mut cfg = ShieldConfig::default();
        cfg.limit = Some(LimitPolicy {
            quota: quota(5),
            mode: Mode::Shadow,
        });
        let s = Shield::new(cfg, ManualClock::new());
        let (ok, ds) = run(&s, "127.0.0.2", "/", 10);
        assert_eq!(ok, 10);
        assert_eq!(
            ds.iter()
                .filter(|d| d.would_block == Some(RejectReason::RateLimited))
                .count(),
            5
        );
    }

    #[test]
    fn routes_have_their_own_limits() {
        let mut cfg = ShieldConfig::default();
        cfg.routes = vec![
            RouteConfig {
                name: "login".into(),
                matcher: RouteMatch {
                    path_prefix: Some("/login".into()),
                    methods: vec![Method::GET],
                    host: Some("EXAMPLE.com".into()),
                    case_sensitive: false,
                },
                limit: Some(LimitPolicy {
                    quota: quota(2),
                    mode: Mode::Enforce,
                }),
                key: LimitKey::Client,
                rate_headers: None,
                anonymous: None,
            },
            RouteConfig {
                name: "static".into(),
                matcher: RouteMatch {
                    path_prefix: Some("/static/".into()),
                    ..Default::default()
                },
                limit: None,
                key: LimitKey::Client,
                rate_headers: None,
                anonymous: None,
            },
        ];
        let s = Shield::new(cfg, ManualClock::new());
        let (ok, ds) = run(&s, "10.0.0.1", "/login/x", 5);
        assert_eq!(ok, 2);
        assert_eq!(s.route_name(ds[0].route), "login");
        assert_eq!(run(&s, "10.0.0.1", "/loginx", 1).1[0].route, 0);
        // Case-insensitive unless the route says otherwise.
        assert_eq!(
            s.route_name(run(&s, "10.0.0.1", "/LOGIN/x", 1).1[0].route),
            "login"
        );
        // The default limiter is separate from the login one.
        assert_eq!(run(&s, "10.0.0.1", "/", 5).0, 5);
        // A route without its own limit shares the default limiter.
        let (_, ds) = run(&s, "10.0.0.1", "/static/a.css", 1);
        assert_eq!(s.route_name(ds[0].route), "static");
        assert_eq!(s.limiters().count(), 2);
    }

    #[test]
    fn allow_and_deny_lists_win() {
        let mut cfg = ShieldConfig::default();
        cfg.allow = vec!["10.1.0.0/16".parse().unwrap()];
        cfg.deny = vec!["10.0.0.0/8".parse().unwrap()];
        cfg.limit = Some(LimitPolicy {
            quota: quota(1),
            mode: Mode::Enforce,
        });
        let s = Shield::new(cfg, ManualClock::new());
        assert_eq!(run(&s, "10.1.2.3", "/", 50).0, 50);
        let (ok, ds) = run(&s, "10.2.0.1", "/", 1);
        assert_eq!(ok, 0);
        assert_eq!(ds[0].rejection.unwrap().reason, RejectReason::Denylisted);
        // Allow-listed clients are not scored either.
        let rep = s.reputation().unwrap();
        rep.set(&ClientKey::from_ip("10.1.2.3".parse().unwrap(), 64), 0, 0);
        assert_eq!(run(&s, "10.1.2.3", "/", 1).0, 1);
    }

    #[test]
    fn flooding_client_ends_in_403() {
        let clock = ManualClock::new();
        let s = Shield::new(ShieldConfig::default(), clock.clone());
        for _ in 0..3 {
            run(&s, "127.0.0.9", "/", 250);
            clock.advance(std::time::Duration::from_secs(1));
        }
        let (_, ds) = run(&s, "127.0.0.9", "/", 1);
        assert_eq!(ds[0].rejection.unwrap().reason, RejectReason::Reputation);
    }

    /// A flood of fresh addresses against a full client table: the
    /// penalized client stays refused (its record is not taken), and no
    /// newcomer is refused for reputation, whatever record it shares.
    #[test]
    fn a_key_flood_neither_frees_a_penalized_client_nor_blocks_newcomers() {
        let clock = ManualClock::new();
        let mut cfg = ShieldConfig::default();
        cfg.max_tracked_clients = 1000;
        let s = Shield::new(cfg, clock.clone());
        for _ in 0..3 {
            run(&s, "127.0.0.9", "/", 250);
            clock.advance(std::time::Duration::from_secs(1));
        }
        let refused = |s: &Shield<ManualClock>| run(s, "127.0.0.9", "/", 1).1[0].rejection.map(|r| r.reason);
        assert_eq!(refused(&s), Some(RejectReason::Reputation));
        let m = Method::GET;
        let h = HeaderMap::new();
        let mut by_reason = std::collections::HashMap::new();
        for i in 0..100_000u32 {
            // Over four seconds: a shared record would collect a flood
            // penalty each second.
            if i % 25_000 == 0 {
                clock.advance(std::time::Duration::from_secs(1));
            }
            let peer = IpAddr::from(std::net::Ipv4Addr::from(0xC612_0000 + i)).to_string();
            for _ in 0..3 {
                let d = s.decide(&facts(&peer, "/", &m, &h));
                *by_reason.entry(d.rejection.map(|r| r.reason)).or_insert(0u32) += 1;
            }
        }
        let rep = s.reputation().unwrap().table();
        assert!(rep.overflowed() > 0, "the flood did not fill the table");
        assert_eq!(
            by_reason.get(&Some(RejectReason::Reputation)),
            None,
            "{by_reason:?}"
        );
        assert_eq!(refused(&s), Some(RejectReason::Reputation));
    }

    /// The default limiter and reputation keep each client in one record.
    /// A key flood against the full table evicts neither a client whose
    /// only state is a spent rate limit nor one whose only state is a low
    /// score, and an admin reputation reset leaves the rate limit spent.
    #[test]
    fn one_record_holds_a_clients_rate_limit_and_score() {
        let mut cfg = ShieldConfig::default();
        cfg.max_tracked_clients = 1000;
        let s = Shield::new(cfg, ManualClock::new());
        let clients = s.clients().unwrap();
        let (_, limiter) = s.limiters().next().unwrap();
        assert!(Arc::ptr_eq(clients, limiter.table()));
        assert!(Arc::ptr_eq(clients, s.reputation().unwrap().table()));
        let reason = |peer: &str| run(&s, peer, "/", 1).1[0].rejection.map(|r| r.reason);
        // Spent rate limit, initial score.
        assert_eq!(run(&s, "127.0.0.7", "/", 101).0, 100);
        // Low score, full bucket.
        let penalized = s.key_for_ip("127.0.0.8".parse().unwrap());
        s.reputation().unwrap().set(&penalized, 10, 0);
        assert_eq!(clients.len(), 2);
        let (m, h) = (Method::GET, HeaderMap::new());
        for i in 0..100_000u32 {
            let peer = IpAddr::from(std::net::Ipv4Addr::from(0xC612_0000 + i)).to_string();
            let d = s.decide(&facts(&peer, "/", &m, &h));
            // Those sharing an overflow record share its rate limit.
            let reason = d.rejection.map(|r| r.reason);
            assert_ne!(reason, Some(RejectReason::Reputation), "newcomer {peer}");
        }
        assert!(clients.overflowed() > 0, "the flood did not fill the table");
        assert_eq!(reason("127.0.0.7"), Some(RejectReason::RateLimited));
        assert_eq!(reason("127.0.0.8"), Some(RejectReason::Reputation));
        let limited = s.key_for_ip("127.0.0.7".parse().unwrap());
        assert!(s.reputation().unwrap().reset(&limited));
        assert!(s.reputation().unwrap().reset(&penalized));
        assert_eq!(reason("127.0.0.7"), Some(RejectReason::RateLimited));
        assert_eq!(reason("127.0.0.8"), None);
    }

    #[test]
    fn spoofed_forwarded_for_changes_nothing() {
        let mut cfg = ShieldConfig::default();
        cfg.trusted_proxies = TrustedProxies::new(
            vec!["127.0.0.1/32".parse().unwrap()],
            ClientIpHeader::XForwardedFor,
        );
        let s = Shield::new(cfg, ManualClock::new());
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "198.51.100.1".parse().unwrap());
        let m = Method::GET;
        let untrusted = s.decide(&facts("127.0.0.2", "/", &m, &h));
        assert_eq!(untrusted.client_ip, "127.0.0.2".parse::<IpAddr>().unwrap());
        let trusted = s.decide(&facts("127.0.0.1", "/", &m, &h));
        assert_eq!(trusted.client_ip, "198.51.100.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn error_streak_feedback_penalises() {
        let s = Shield::new(ShieldConfig::default(), ManualClock::new());
        let (_, ds) = run(&s, "127.0.0.5", "/", 1);
        assert!(!s.observe_response(&ds[0], 401).penalized);
        assert!(!s.observe_response(&ds[0], 401).penalized);
        assert!(s.observe_response(&ds[0], 401).penalized);
        let e = s.reputation().unwrap().explain(&ds[0].key, 0);
        assert_eq!(e.score, 60.0);
    }

    #[test]
    fn reload_keeps_state_and_applies_new_limits() {
        let clock = ManualClock::new();
        let s = Shield::new(ShieldConfig::default(), clock.clone());
        assert_eq!(run(&s, "10.0.0.1", "/", 60).0, 60);
        s.reputation().unwrap().set(&ClientKey::V4(0x0a00_0002), 40, 0);
        let mut cfg = ShieldConfig::default();
        cfg.limit = Some(LimitPolicy {
            quota: quota(50),
            mode: Mode::Enforce,
        });
        let reloaded = Shield::carrying_over(cfg.clone(), clock.clone(), Some(&s));
        // 60 already spent this second; the new window limit is 50.
        assert_eq!(run(&reloaded, "10.0.0.1", "/", 10).0, 0);
        let e = reloaded
            .reputation()
            .unwrap()
            .explain(&ClientKey::V4(0x0a00_0002), 0);
        assert_eq!(e.score, 40.0);
        // A resized table starts afresh.
        cfg.max_tracked_clients = 10;
        let resized = Shield::carrying_over(cfg, clock, Some(&reloaded));
        assert_eq!(run(&resized, "10.0.0.1", "/", 10).0, 10);
    }

    #[test]
    fn a_ja4_breaker_holds_one_tls_stack_whatever_its_user_agent() {
        let clock = ManualClock::new();
        let cfg = ShieldConfig {
            breaker_fingerprint: BreakerFingerprint::Ja4,
            ..ShieldConfig::default()
        };
        let s = Shield::new(cfg, clock.clone());
        let m = Method::GET;
        let ja4 = Some("t13d3112h2_e8f1e7e78f70_b26ce05bbdd6");
        let with_ua = |i: usize| {
            let mut h = HeaderMap::new();
            h.insert("user-agent", format!("bot/{i}").parse().unwrap());
            h
        };
        let request = |peer: &str, h: &HeaderMap, ja4: Option<&'static str>| {
            let mut f = facts(peer, "/", &m, h);
            f.tls_fingerprint = ja4;
            s.decide(&f)
        };
        let mut refused = 0;
        for i in 0..20 {
            clock.advance(std::time::Duration::from_millis(20));
            let d = request("10.7.7.7", &with_ua(i), ja4);
            if d.rejection.is_some() {
                refused += 1;
                continue;
            }
            s.observe_response(&d, 500);
        }
        assert!(refused >= 8, "{refused} of 20 refused");
        let d = request("10.7.7.7", &with_ua(99), ja4);
        assert_eq!(d.rejection.unwrap().reason, RejectReason::ClientBreakerOpen);
        // Another TLS stack from that address, or that stack from another
        // address: breakers of their own.
        assert!(
            request(
                "10.7.7.7",
                &with_ua(99),
                Some("t13d1516h2_8daaf6152771_d8a2da3f94cd")
            )
            .rejection
            .is_none()
        );
        assert!(request("10.7.7.8", &with_ua(99), ja4).rejection.is_none());
        // Plain HTTP: the User-Agent's fingerprint, as without JA4.
        for i in 0..20 {
            clock.advance(std::time::Duration::from_millis(20));
            let d = request("10.7.7.9", &with_ua(i), None);
            assert!(d.rejection.is_none(), "request {i}");
            s.observe_response(&d, 500);
        }
        // A connection's failures count against its JA4 too.
        for _ in 0..11 {
            s.observe_connection_failure("10.7.7.10".parse().unwrap(), Signal::TlsHandshakeTimeout, ja4);
        }
        let d = request("10.7.7.10", &with_ua(1), ja4);
        assert_eq!(d.rejection.unwrap().reason, RejectReason::ClientBreakerOpen);
    }

    #[test]
    fn failing_fingerprint_is_degraded_then_opened_per_user_agent() {
        let clock = ManualClock::new();
        let s = Shield::new(ShieldConfig::default(), clock.clone());
        let m = Method::GET;
        let mut bad = HeaderMap::new();
        bad.insert("user-agent", "bad-bot/1".parse().unwrap());
        let mut good = HeaderMap::new();
        good.insert("user-agent", "browser/1".parse().unwrap());
        let mut transitions = Vec::new();
        for _ in 0..12 {
            clock.advance(std::time::Duration::from_millis(20));
            let d = s.decide(&facts("10.9.9.9", "/", &m, &bad));
            transitions.extend(d.transition);
            transitions.extend(s.observe_response(&d, 500).transition);
        }
        let to: Vec<_> = transitions.iter().map(|t| t.to.as_str()).collect();
        assert_eq!(to, ["degraded", "open"]);
        let d = s.decide(&facts("10.9.9.9", "/", &m, &bad));
        assert_eq!(d.rejection.unwrap().reason, RejectReason::ClientBreakerOpen);
        // Same address, another User-Agent: another fingerprint, untouched.
        assert!(s.decide(&facts("10.9.9.9", "/", &m, &good)).rejection.is_none());
        // Connection-level failures count against the empty User-Agent.
        // Ten failures degrade (volume floor), the eleventh opens.
        for _ in 0..11 {
            s.observe_connection_failure("10.8.8.8".parse().unwrap(), Signal::HeaderParseFailure, None);
        }
        let d = s.decide(&facts("10.8.8.8", "/", &m, &HeaderMap::new()));
        assert_eq!(d.rejection.unwrap().reason, RejectReason::ClientBreakerOpen);
    }

    #[test]
    fn host_ports_are_ignored() {
        assert_eq!(strip_port("example.com:80"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
