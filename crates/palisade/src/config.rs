//! The protection sections of the `palisade` daemon's TOML file —
//! `[clients]`, `[rate_limit]`, `[reputation]`, `[adaptive_breaker]`,
//! `[breaker]`, `[connections]` and `[[routes]]` — read by the same code the
//! daemon reads them with. The daemon's own sections (`[server]`,
//! `[upstream]`, `[admin]`, ...) are accepted and ignored; anything else is
//! an error naming the file, line, column and key.

use std::num::NonZeroU32;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use http::Method;
use ipnet::IpNet;
use palisade_core::{ClientIpHeader, Mode, TrustedProxies};
use palisade_limits::adaptive::AdaptiveConfig;
use palisade_limits::admission::AdmissionConfig;
use palisade_limits::breaker::BreakerConfig;
use palisade_limits::rate::{Period, Quota};
use palisade_limits::reputation::ReputationConfig;
use palisade_limits::shield::{
    BreakerFingerprint, KeyBy, LimitKey, LimitPolicy, RateHeaders, RouteConfig, RouteMatch, ShieldConfig,
};
use serde::Deserialize;
use serde::de::IgnoredAny;
use toml::de::{DeTable, DeValue};

use crate::breaker::{BreakerSettings, StatusSet};

/// What the protection sections of a config file decide.
#[derive(Debug, Clone)]
pub struct Protection {
    /// Client identity, allow/deny lists, rate limits, routes, reputation
    /// and the adaptive breaker.
    pub shield: ShieldConfig,
    /// `[breaker]`: the classic breaker, when enabled.
    pub breaker: Option<BreakerSettings>,
    /// `[connections]`: the connection guard's bounds.
    pub connections: AdmissionConfig,
    /// `server.proxy_protocol`: the time allowed for a trusted proxy's
    /// PROXY header (`server.header_read_timeout`), when on.
    pub proxy_protocol: Option<Duration>,
}

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// A key is wrong (or, with an empty `key`, the TOML itself is).
    #[error("{file}:{line}:{column}: {}{message}", if key.is_empty() { String::new() } else { format!("{key}: ") })]
    Invalid {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Dotted key path (`rate_limit.rate`, `routes[1].name`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Protection {
    /// Reads the protection sections of a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        Self::parse(&ConfigError::read(path)?, &path.display().to_string())
    }

    /// Reads the protection sections of config text; `file` names it in
    /// errors.
    pub fn parse(src: &str, file: &str) -> Result<Self, ConfigError> {
        let raw: RawFile =
            toml::from_str(src).map_err(|e| ConfigError::invalid(file, raw::toml_error(src, &e)))?;
        let located = |invalid| ConfigError::invalid(file, raw::locate(src, invalid));
        let mut protection = raw.sections().validate().map_err(located)?;
        // A route the file wants challenged must not silently go without.
        if let Some(i) = raw
            .routes
            .iter()
            .position(|r| r.challenge.as_deref().is_some_and(|c| c != "off"))
        {
            return Err(located(raw::at(
                crate::__config_path!("routes", i, "challenge"),
                "the challenge page is served by the palisade daemon, not by the library's layers",
            )));
        }
        // Nor a JA4 key silently count by address: these layers see no TLS.
        let ja4_route = raw.routes.iter().position(|r| r.key.as_deref() == Some("ja4"));
        let ja4_default = raw.rate_limit.key.as_deref() == Some("ja4");
        let ja4_breaker = raw.adaptive_breaker.fingerprint == "ja4";
        if ja4_route.is_some() || ja4_default || ja4_breaker {
            let message = "a JA4 fingerprint is computed by the palisade daemon's TLS listener, not by the library's layers";
            return Err(located(match ja4_route {
                Some(i) => raw::at(crate::__config_path!("routes", i, "key"), message),
                None if ja4_default => raw::at(crate::__config_path!("rate_limit", "key"), message),
                None => raw::at(crate::__config_path!("adaptive_breaker", "fingerprint"), message),
            }));
        }
        protection.proxy_protocol = raw.proxy_protocol(&protection.shield).map_err(located)?;
        Ok(protection)
    }
}

impl ConfigError {
    /// The text of a config file, or a `Read` error naming it.
    pub fn read(path: &Path) -> Result<String, Self> {
        std::fs::read_to_string(path).map_err(|source| Self::Read {
            file: path.display().to_string(),
            source,
        })
    }

    /// An `Invalid` error from a located problem: line, column, key, message.
    pub fn invalid(file: &str, (line, column, key, message): (usize, usize, String, String)) -> Self {
        Self::Invalid {
            file: file.to_string(),
            line,
            column,
            key,
            message,
        }
    }
}

/// The whole file as the library sees it.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawFile {
    clients: raw::RawClients,
    rate_limit: raw::RawRateLimit,
    reputation: raw::RawReputation,
    breaker: raw::RawBreaker,
    adaptive_breaker: raw::RawAdaptive,
    connections: raw::RawConnections,
    routes: Vec<raw::RawRoute>,
    /// Only its PROXY-protocol keys; the rest is the daemon's.
    server: ServerPart,
    // The daemon's own sections, checked by `palisade check-config`.
    upstream: IgnoredAny,
    upstreams: IgnoredAny,
    admin: IgnoredAny,
    tls: IgnoredAny,
    watchdog: IgnoredAny,
    store: IgnoredAny,
    state: IgnoredAny,
    cluster: IgnoredAny,
    syn: IgnoredAny,
    access_log: IgnoredAny,
    challenge: IgnoredAny,
}

/// `[server]` as the library reads it: unknown keys are the daemon's.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct ServerPart {
    proxy_protocol: bool,
    header_read_timeout: String,
}

impl Default for ServerPart {
    fn default() -> Self {
        Self {
            proxy_protocol: false,
            header_read_timeout: "5s".into(),
        }
    }
}

impl RawFile {
    /// `server.proxy_protocol`, with the time allowed for its header.
    fn proxy_protocol(&self, shield: &ShieldConfig) -> Result<Option<Duration>, raw::Invalid> {
        if !self.server.proxy_protocol {
            return Ok(None);
        }
        raw::proxy_protocol_allowed(shield)?;
        raw::duration(
            &self.server.header_read_timeout,
            crate::__config_path!("server", "header_read_timeout"),
        )
        .map(Some)
    }

    fn sections(&self) -> raw::Sections<'_> {
        raw::Sections {
            clients: &self.clients,
            rate_limit: &self.rate_limit,
            reputation: &self.reputation,
            breaker: &self.breaker,
            adaptive_breaker: &self.adaptive_breaker,
            connections: &self.connections,
            routes: &self.routes,
        }
    }
}

/// A key path in the config file: `p!("routes", 2, "name")`.
#[doc(hidden)]
#[macro_export]
macro_rules! __config_path {
    ($($seg:expr),*) => { &[$($crate::config::raw::Seg::from($seg)),*][..] };
}

/// The raw sections and validation helpers, shared with the daemon's
/// parser so both read the file the same way. Not a stable API.
#[doc(hidden)]
pub mod raw {
    use super::*;
    use crate::__config_path as p;

    /// The protection sections of a parsed file.
    pub struct Sections<'a> {
        pub clients: &'a RawClients,
        pub rate_limit: &'a RawRateLimit,
        pub reputation: &'a RawReputation,
        pub breaker: &'a RawBreaker,
        pub adaptive_breaker: &'a RawAdaptive,
        pub connections: &'a RawConnections,
        pub routes: &'a [RawRoute],
    }

    impl Sections<'_> {
        /// Every protection section, typed.
        pub fn validate(&self) -> Result<Protection, Invalid> {
            Ok(Protection {
                shield: self.shield()?,
                breaker: self.breaker()?,
                connections: self.connections()?,
                // A `[server]` key: set by the library's reader, the daemon has its own.
                proxy_protocol: None,
            })
        }

        fn connections(&self) -> Result<AdmissionConfig, Invalid> {
            let c = self.connections;
            if c.max == 0 {
                return Err(at(p!("connections", "max"), "must be > 0"));
            }
            if c.max_per_ip == 0 {
                return Err(at(p!("connections", "max_per_ip"), "must be > 0"));
            }
            Ok(AdmissionConfig {
                max_connections: c.max,
                max_per_ip: c.max_per_ip,
                new_per_ip_per_second: NonZeroU32::new(c.new_per_ip_per_second),
                new_per_second: NonZeroU32::new(c.new_per_second),
                max_in_flight_per_ip: match c.max_in_flight_per_ip {
                    0 => return Err(at(p!("connections", "max_in_flight_per_ip"), "must be > 0")),
                    n => n,
                },
            })
        }
    }

    /// `server.proxy_protocol` is only for a config with trusted proxies.
    pub fn proxy_protocol_allowed(shield: &ShieldConfig) -> Result<(), Invalid> {
        if shield.trusted_proxies.is_empty() {
            return Err(at(
                p!("server", "proxy_protocol"),
                "needs clients.trusted_proxies: only they may send PROXY headers",
            ));
        }
        Ok(())
    }

    /// Line, column, dotted key and message of a TOML syntax or type error.
    pub fn toml_error(src: &str, e: &toml::de::Error) -> (usize, usize, String, String) {
        let key = e.span().and_then(|s| key_at(src, s.start)).unwrap_or_default();
        let (line, column) = line_col(src, e.span().map_or(0, |s| s.start));
        (line, column, key, e.message().trim().to_string())
    }

    /// Line, column, dotted key and message of a validation error.
    pub fn locate(src: &str, (path, message): Invalid) -> (usize, usize, String, String) {
        let (line, column) = line_col(src, span_of(src, &path).map_or(0, |s| s.start));
        (line, column, path_string(&path), message)
    }

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RawConnections {
        pub max: u32,
        pub max_per_ip: u32,
        pub new_per_ip_per_second: u32,
        pub new_per_second: u32,
        pub max_in_flight_per_ip: u32,
    }

    impl Default for RawConnections {
        fn default() -> Self {
            Self {
                max: 10_000,
                max_per_ip: 100,
                new_per_ip_per_second: 50,
                new_per_second: 0,
                max_in_flight_per_ip: 100,
            }
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RawClients {
        pub key: String,
        pub ipv6_prefix: u8,
        pub trusted_proxies: Vec<String>,
        pub client_ip_header: String,
        pub max_tracked: usize,
        pub allow: Vec<String>,
        pub deny: Vec<String>,
    }

    impl Default for RawClients {
        fn default() -> Self {
            Self {
                key: "ip".into(),
                ipv6_prefix: 64,
                trusted_proxies: Vec::new(),
                client_ip_header: "x-forwarded-for".into(),
                max_tracked: 100_000,
                allow: Vec::new(),
                deny: Vec::new(),
            }
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RawRateLimit {
        pub enabled: bool,
        pub mode: String,
        pub rate: RawRate,
        pub burst: Option<u32>,
        pub window_limit: Option<u32>,
        pub key: Option<String>,
        pub headers: String,
    }

    impl Default for RawRateLimit {
        fn default() -> Self {
            Self {
                enabled: true,
                mode: "enforce".into(),
                rate: RawRate::per_second(100),
                burst: None,
                window_limit: None,
                key: None,
                headers: "refused".into(),
            }
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RawReputation {
        pub enabled: bool,
        pub mode: String,
        pub initial: u8,
        pub block_below: u8,
        pub flood_threshold: Option<u32>,
        pub flood_penalty: u8,
        pub error_streak: u8,
        pub error_penalty: u8,
        pub recovery_per_minute: f64,
    }

    impl Default for RawReputation {
        fn default() -> Self {
            let d = ReputationConfig::default();
            Self {
                enabled: true,
                mode: "enforce".into(),
                initial: d.initial,
                block_below: d.block_below,
                flood_threshold: None,
                flood_penalty: d.flood_penalty,
                error_streak: d.error_streak,
                error_penalty: d.error_penalty,
                recovery_per_minute: d.recovery_per_minute,
            }
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RawBreaker {
        pub enabled: bool,
        pub min_requests: u32,
        pub failure_ratio: f64,
        pub interval: String,
        pub open_for: String,
        pub probes: u32,
        pub failure_statuses: Vec<String>,
    }

    impl Default for RawBreaker {
        fn default() -> Self {
            Self {
                enabled: true,
                min_requests: 5,
                failure_ratio: 0.6,
                interval: "10s".into(),
                open_for: "30s".into(),
                probes: 3,
                failure_statuses: vec!["5xx".into()],
            }
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RawAdaptive {
        pub enabled: bool,
        pub mode: String,
        pub degrade_above: f64,
        pub open_above: f64,
        pub recover_below: f64,
        pub recover_after: String,
        pub min_requests: u32,
        pub open_for: String,
        pub probes: u32,
        pub degraded_rate_factor: f64,
        pub slow_first_byte: String,
        pub fingerprint: String,
    }

    impl Default for RawAdaptive {
        fn default() -> Self {
            let d = AdaptiveConfig::default();
            Self {
                enabled: true,
                mode: "enforce".into(),
                degrade_above: d.degrade_above,
                open_above: d.open_above,
                recover_below: d.recover_below,
                recover_after: "10s".into(),
                min_requests: d.min_requests,
                open_for: "30s".into(),
                probes: d.probes,
                degraded_rate_factor: d.degraded_rate_factor,
                slow_first_byte: "800ms".into(),
                fingerprint: "user_agent".into(),
            }
        }
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RawRoute {
        pub name: String,
        pub path_prefix: Option<String>,
        pub methods: Vec<String>,
        pub host: Option<String>,
        pub case_sensitive: bool,
        pub rate: Option<RawRate>,
        pub burst: Option<u32>,
        pub window_limit: Option<u32>,
        pub key: Option<String>,
        pub mode: Option<String>,
        /// Which responses carry the rate-limit fields; unset follows `rate_limit.headers`.
        pub headers: Option<String>,
        /// The limit of requests without the route's `key`, by client.
        pub anonymous_rate: Option<RawRate>,
        pub anonymous_burst: Option<u32>,
        pub anonymous_window_limit: Option<u32>,
        /// The daemon's proof-of-work challenge (`off` here).
        pub challenge: Option<String>,
        pub challenge_below: Option<u8>,
        /// A machine API: never challenged.
        pub api: bool,
        /// The daemon's: which `[[upstreams]]` pool the route's requests go to.
        pub upstream: Option<String>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub enum Seg {
        Key(&'static str),
        Index(usize),
    }

    pub type Invalid = (Vec<Seg>, String);

    pub fn at(path: &[Seg], message: impl Into<String>) -> Invalid {
        (path.to_vec(), message.into())
    }

    impl From<&'static str> for Seg {
        fn from(k: &'static str) -> Self {
            Seg::Key(k)
        }
    }

    impl From<usize> for Seg {
        fn from(i: usize) -> Self {
            Seg::Index(i)
        }
    }

    impl Sections<'_> {
        fn adaptive(&self) -> Result<Option<(AdaptiveConfig, Mode)>, Invalid> {
            let a = &self.adaptive_breaker;
            if !a.enabled {
                return Ok(None);
            }
            let ratio = |v: f64, key: &'static str| {
                if v.is_finite() && v >= 0.0 {
                    Ok(v)
                } else {
                    Err(at(p!("adaptive_breaker", key), "must be a number >= 0"))
                }
            };
            let cfg = AdaptiveConfig {
                degrade_above: ratio(a.degrade_above, "degrade_above")?,
                open_above: ratio(a.open_above, "open_above")?,
                recover_below: ratio(a.recover_below, "recover_below")?,
                recover_after: nanos(duration(
                    &a.recover_after,
                    p!("adaptive_breaker", "recover_after"),
                )?),
                min_requests: match a.min_requests {
                    0 => return Err(at(p!("adaptive_breaker", "min_requests"), "must be > 0")),
                    n => n,
                },
                open_for: nanos(duration(&a.open_for, p!("adaptive_breaker", "open_for"))?),
                probes: match a.probes {
                    1..=1000 => a.probes,
                    _ => return Err(at(p!("adaptive_breaker", "probes"), "must be between 1 and 1000")),
                },
                degraded_rate_factor: match a.degraded_rate_factor {
                    f if f > 0.0 && f <= 1.0 => f,
                    _ => {
                        return Err(at(
                            p!("adaptive_breaker", "degraded_rate_factor"),
                            "must be in (0, 1]",
                        ));
                    }
                },
                slow_first_byte: nanos(duration(
                    &a.slow_first_byte,
                    p!("adaptive_breaker", "slow_first_byte"),
                )?),
            };
            if cfg.open_above < cfg.degrade_above {
                return Err(at(
                    p!("adaptive_breaker", "open_above"),
                    format!(
                        "must not be below adaptive_breaker.degrade_above ({})",
                        cfg.degrade_above
                    ),
                ));
            }
            if cfg.recover_below > cfg.degrade_above {
                return Err(at(
                    p!("adaptive_breaker", "recover_below"),
                    format!(
                        "must not exceed adaptive_breaker.degrade_above ({})",
                        cfg.degrade_above
                    ),
                ));
            }
            Ok(Some((cfg, mode(&a.mode, p!("adaptive_breaker", "mode"))?)))
        }

        fn breaker(&self) -> Result<Option<BreakerSettings>, Invalid> {
            let b = &self.breaker;
            if !b.enabled {
                return Ok(None);
            }
            if b.min_requests == 0 {
                return Err(at(p!("breaker", "min_requests"), "must be > 0"));
            }
            if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
                return Err(at(p!("breaker", "failure_ratio"), "must be in (0, 1]"));
            }
            if b.probes == 0 {
                return Err(at(p!("breaker", "probes"), "must be > 0"));
            }
            let failure_statuses = StatusSet::parse(&b.failure_statuses)
                .map_err(|(i, message)| at(p!("breaker", "failure_statuses", i), message))?;
            Ok(Some(BreakerSettings {
                rules: BreakerConfig {
                    min_requests: b.min_requests,
                    failure_ratio: b.failure_ratio,
                    interval: nanos(duration(&b.interval, p!("breaker", "interval"))?),
                    open_for: nanos(duration(&b.open_for, p!("breaker", "open_for"))?),
                    probes: b.probes,
                },
                failure_statuses,
            }))
        }

        fn shield(&self) -> Result<ShieldConfig, Invalid> {
            let c = &self.clients;
            let nets = |list: &[String], key: &'static str| -> Result<Vec<IpNet>, Invalid> {
                list.iter()
                    .enumerate()
                    .map(|(i, s)| cidr(s).map_err(|m| at(p!("clients", key, i), m)))
                    .collect()
            };
            let key_by = match c.key.as_str() {
                "ip" => KeyBy::Ip,
                "ip_user_agent" => KeyBy::IpUserAgent,
                other => {
                    return Err(at(
                        p!("clients", "key"),
                        format!("unknown key kind {other:?}; expected \"ip\" or \"ip_user_agent\""),
                    ));
                }
            };
            if c.ipv6_prefix > 128 {
                return Err(at(p!("clients", "ipv6_prefix"), "must be between 0 and 128"));
            }
            let header = match c.client_ip_header.to_ascii_lowercase().as_str() {
                "x-forwarded-for" => ClientIpHeader::XForwardedFor,
                "forwarded" => ClientIpHeader::Forwarded,
                other => {
                    return Err(at(
                        p!("clients", "client_ip_header"),
                        format!("unknown header {other:?}; expected \"x-forwarded-for\" or \"forwarded\""),
                    ));
                }
            };
            // Tables are allocated up front (~300 bytes per client for limiter
            // and reputation): a typo must not ask for terabytes.
            if !(1..=20_000_000).contains(&c.max_tracked) {
                return Err(at(p!("clients", "max_tracked"), "must be between 1 and 20000000"));
            }
            let rl = &self.rate_limit;
            let default_quota = quota(
                rl.rate,
                rl.burst,
                rl.window_limit,
                [
                    p!("rate_limit", "rate"),
                    p!("rate_limit", "burst"),
                    p!("rate_limit", "window_limit"),
                ],
            )?;
            let limit = rl.enabled.then_some(LimitPolicy {
                quota: default_quota,
                mode: mode(&rl.mode, p!("rate_limit", "mode"))?,
            });
            let r = &self.reputation;
            let rep_cfg = ReputationConfig {
                initial: percent(r.initial, p!("reputation", "initial"))?,
                block_below: percent(r.block_below, p!("reputation", "block_below"))?,
                flood_threshold: match r.flood_threshold {
                    Some(0) => return Err(at(p!("reputation", "flood_threshold"), "must be > 0")),
                    Some(n) => n,
                    None => flood_threshold(&default_quota),
                },
                flood_penalty: percent(r.flood_penalty, p!("reputation", "flood_penalty"))?,
                error_streak: match r.error_streak {
                    0 => return Err(at(p!("reputation", "error_streak"), "must be > 0")),
                    n => n,
                },
                error_penalty: percent(r.error_penalty, p!("reputation", "error_penalty"))?,
                recovery_per_minute: if r.recovery_per_minute.is_finite() && r.recovery_per_minute >= 0.0 {
                    r.recovery_per_minute
                } else {
                    return Err(at(
                        p!("reputation", "recovery_per_minute"),
                        "must be a number >= 0",
                    ));
                },
            };
            if rep_cfg.block_below > rep_cfg.initial {
                return Err(at(
                    p!("reputation", "block_below"),
                    format!("must not exceed reputation.initial ({})", rep_cfg.initial),
                ));
            }
            let reputation = if r.enabled {
                Some((rep_cfg, mode(&r.mode, p!("reputation", "mode"))?))
            } else {
                None
            };
            let mut routes = Vec::with_capacity(self.routes.len());
            for (i, route) in self.routes.iter().enumerate() {
                routes.push(route.validate(i, &routes, default_quota, rl)?);
            }
            let adaptive = self.adaptive()?;
            let breaker_fingerprint = match self.adaptive_breaker.fingerprint.as_str() {
                "user_agent" => BreakerFingerprint::ClientUserAgent,
                "ja4" => BreakerFingerprint::Ja4,
                other => {
                    return Err(at(
                        p!("adaptive_breaker", "fingerprint"),
                        format!("unknown fingerprint {other:?}; expected \"user_agent\" or \"ja4\""),
                    ));
                }
            };
            Ok(ShieldConfig {
                adaptive,
                breaker_fingerprint,
                key_by,
                ipv6_prefix: c.ipv6_prefix,
                trusted_proxies: TrustedProxies::new(nets(&c.trusted_proxies, "trusted_proxies")?, header),
                allow: nets(&c.allow, "allow")?,
                deny: nets(&c.deny, "deny")?,
                max_tracked_clients: c.max_tracked,
                limit,
                limit_key: match &rl.key {
                    Some(k) => limit_key(k, p!("rate_limit", "key"))?,
                    None => LimitKey::Client,
                },
                rate_headers: rate_headers(&rl.headers, p!("rate_limit", "headers"))?,
                routes,
                reputation,
                // Opened by the App and shared across reloads.
                store: None,
            })
        }
    }

    impl RawRoute {
        fn validate(
            &self,
            i: usize,
            earlier: &[RouteConfig],
            default: Quota,
            rl: &RawRateLimit,
        ) -> Result<RouteConfig, Invalid> {
            let name = self.name.trim();
            let valid_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
            if !valid_name {
                return Err(at(
                    p!("routes", i, "name"),
                    "required: 1-64 characters from [A-Za-z0-9_.-]",
                ));
            }
            if name == "default" || earlier.iter().any(|r| r.name == name) {
                return Err(at(
                    p!("routes", i, "name"),
                    format!("route name {name:?} is already used"),
                ));
            }
            // Requests are matched on their normalized path, so a prefix
            // spelled any other way could never match.
            if let Some(prefix) = &self.path_prefix {
                if !prefix.starts_with('/') {
                    return Err(at(p!("routes", i, "path_prefix"), "must start with '/'"));
                }
                match palisade_core::normalize_path(prefix) {
                    Ok(std::borrow::Cow::Borrowed(_)) => {}
                    Ok(normal) => {
                        return Err(at(
                            p!("routes", i, "path_prefix"),
                            format!("requests are matched on their normalized path: write {normal:?}"),
                        ));
                    }
                    Err(e) => return Err(at(p!("routes", i, "path_prefix"), e.to_string())),
                }
                if prefix.contains(';') {
                    return Err(at(
                        p!("routes", i, "path_prefix"),
                        "routes match the path without its ;parameters: leave them out",
                    ));
                }
            }
            // Requests' hosts are compared lower case, without a trailing
            // dot or port; so is the route's.
            let host = match &self.host {
                None => None,
                Some(h) => match palisade_core::normalize_host(h.as_bytes(), None) {
                    // One colon is `name:port`; `[v6]:port` ends otherwise.
                    Ok(h) if h.matches(':').count() == 1 || h.starts_with('[') && !h.ends_with(']') => {
                        return Err(at(p!("routes", i, "host"), "write the host without its port"));
                    }
                    // Requests' IPv6 hosts are compared without brackets.
                    Ok(h) => Some(h.trim_start_matches('[').trim_end_matches(']').to_owned()),
                    Err(e) => return Err(at(p!("routes", i, "host"), e.to_string())),
                },
            };
            let methods = self
                .methods
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                        at(
                            p!("routes", i, "methods", j),
                            format!("{m:?} is not an HTTP method"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            let own = self.rate.is_some()
                || self.burst.is_some()
                || self.window_limit.is_some()
                || self.key.is_some()
                || self.mode.is_some()
                || self.anonymous_rate.is_some();
            let limit = if own {
                let rate = self.rate.unwrap_or(RawRate {
                    count: default.rate.get(),
                    per: default.per,
                });
                Some(LimitPolicy {
                    quota: quota(
                        rate,
                        self.burst,
                        self.window_limit,
                        [
                            p!("routes", i, "rate"),
                            p!("routes", i, "burst"),
                            p!("routes", i, "window_limit"),
                        ],
                    )?,
                    mode: mode(self.mode.as_deref().unwrap_or(&rl.mode), p!("routes", i, "mode"))?,
                })
            } else {
                None
            };
            let key = match self.key.as_ref().or(rl.key.as_ref()) {
                Some(k) => limit_key(k, p!("routes", i, "key"))?,
                None => LimitKey::Client,
            };
            let anonymous = self.anonymous(i, &key, limit.as_ref().map(|l| l.mode))?;
            Ok(RouteConfig {
                name: name.to_string(),
                matcher: RouteMatch {
                    path_prefix: self.path_prefix.clone(),
                    methods,
                    host,
                    case_sensitive: self.case_sensitive,
                },
                limit,
                key,
                anonymous,
                rate_headers: self
                    .headers
                    .as_deref()
                    .map(|h| rate_headers(h, p!("routes", i, "headers")))
                    .transpose()?,
            })
        }
    }

    impl RawRoute {
        /// `anonymous_rate`, `anonymous_burst`, `anonymous_window_limit`:
        /// the limit of the route's requests without its key.
        fn anonymous(
            &self,
            i: usize,
            key: &LimitKey,
            mode: Option<Mode>,
        ) -> Result<Option<LimitPolicy>, Invalid> {
            let Some(rate) = self.anonymous_rate else {
                let stray = [
                    (self.anonymous_burst.is_some(), "anonymous_burst"),
                    (self.anonymous_window_limit.is_some(), "anonymous_window_limit"),
                ];
                return match stray.into_iter().find(|(set, _)| *set) {
                    Some((_, k)) => Err(at(
                        p!("routes", i, k),
                        "needs anonymous_rate, the limit of requests without the key",
                    )),
                    None => Ok(None),
                };
            };
            if matches!(key, LimitKey::Client | LimitKey::Ip | LimitKey::IpUserAgent) {
                return Err(at(
                    p!("routes", i, "anonymous_rate"),
                    "needs a key taken from the request (key = \"header:NAME\", \"cookie:NAME\", \"query:NAME\" or \"ja4\"): anonymous requests are those without it",
                ));
            }
            Ok(Some(LimitPolicy {
                quota: quota(
                    rate,
                    self.anonymous_burst,
                    self.anonymous_window_limit,
                    [
                        p!("routes", i, "anonymous_rate"),
                        p!("routes", i, "anonymous_burst"),
                        p!("routes", i, "anonymous_window_limit"),
                    ],
                )?,
                mode: mode.unwrap_or(Mode::Enforce),
            }))
        }
    }

    /// `headers`: `"refused"` or `"always"`.
    pub fn rate_headers(s: &str, path: &[Seg]) -> Result<RateHeaders, Invalid> {
        match s {
            "refused" => Ok(RateHeaders::Refused),
            "always" => Ok(RateHeaders::Always),
            other => Err(at(
                path,
                format!("unknown value {other:?}; expected \"refused\" or \"always\""),
            )),
        }
    }

    /// `key`: `"ip"`, `"ip_user_agent"`, `"ja4"`, `"header:NAME"`,
    /// `"cookie:NAME"` or `"query:NAME"`.
    pub fn limit_key(s: &str, path: &[Seg]) -> Result<LimitKey, Invalid> {
        let expected =
            "expected \"ip\", \"ip_user_agent\", \"ja4\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\"";
        let named = |name: &str| -> Result<String, Invalid> {
            let ok = !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b";=,&?#\"".contains(&b));
            if ok {
                Ok(name.to_string())
            } else {
                Err(at(
                    path,
                    format!("{s:?}: the name must be 1-128 printable characters"),
                ))
            }
        };
        match s.split_once(':') {
            None if s == "ip" => Ok(LimitKey::Ip),
            None if s == "ip_user_agent" => Ok(LimitKey::IpUserAgent),
            None if s == "ja4" => Ok(LimitKey::Ja4),
            Some(("header", name)) => http::HeaderName::from_bytes(name.as_bytes())
                .map(LimitKey::Header)
                .map_err(|_| at(path, format!("{name:?} is not a header name"))),
            Some(("cookie", name)) => named(name).map(LimitKey::Cookie),
            Some(("query", name)) => named(name).map(LimitKey::Query),
            _ => Err(at(path, format!("unknown key {s:?}; {expected}"))),
        }
    }

    pub fn cidr(s: &str) -> Result<IpNet, String> {
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
            .map(|n| n.trunc())
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))
    }

    /// `rate`: a bare number (per second) or `"count/period"` (`"5/m"`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct RawRate {
        pub count: u32,
        pub per: Period,
    }

    impl RawRate {
        pub const fn per_second(count: u32) -> Self {
            Self {
                count,
                per: Period::Second,
            }
        }
    }

    /// Parses `100`, `"100/s"`, `"5/m"`, `"1000/h"`; the count is checked
    /// by validation, so `"0/m"` parses.
    pub fn parse_rate(s: &str) -> Result<RawRate, String> {
        let example = "e.g. 100, \"100/s\", \"5/m\", \"1000/h\"";
        let (num, unit) = s.split_once('/').unwrap_or((s, "s"));
        let per = match unit.trim() {
            "s" | "sec" | "second" => Period::Second,
            "m" | "min" | "minute" => Period::Minute,
            "h" | "hour" => Period::Hour,
            _ => return Err(format!("{s:?}: the period must be s, m or h ({example})")),
        };
        let count = num
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a rate ({example})"))?;
        Ok(RawRate { count, per })
    }

    impl<'de> Deserialize<'de> for RawRate {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = RawRate;

                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("requests per second, or a string such as \"5/m\"")
                }

                fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<RawRate, E> {
                    u32::try_from(n)
                        .map(RawRate::per_second)
                        .map_err(|_| E::custom(format!("must be between 1 and {MAX_RATE}")))
                }

                fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<RawRate, E> {
                    u32::try_from(n)
                        .map(RawRate::per_second)
                        .map_err(|_| E::custom(format!("must be between 1 and {MAX_RATE}")))
                }

                fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawRate, E> {
                    parse_rate(s).map_err(E::custom)
                }
            }
            d.deserialize_any(Visitor)
        }
    }

    /// A typed quota from a section's `rate`, `burst` and `window_limit`
    /// (`paths` in that order). The burst defaults to the rate's count; the
    /// 1 s window to the rate for a per-second one and to the burst for a
    /// longer period (where it then adds nothing to the bucket), either cut
    /// to what a record counts.
    pub fn quota(
        rate: RawRate,
        burst: Option<u32>,
        window: Option<u32>,
        paths: [&[Seg]; 3],
    ) -> Result<Quota, Invalid> {
        let count = nonzero(rate.count, paths[0])?;
        let burst = nonzero(burst.unwrap_or(count.get()), paths[1])?;
        let window_default = match rate.per {
            Period::Second => count,
            Period::Minute | Period::Hour => burst,
        };
        let q = Quota {
            rate: count,
            per: rate.per,
            burst,
            window_limit: nonzero(window.unwrap_or(window_default.get().min(MAX_WINDOW)), paths[2])?,
        };
        fits_a_record(q, paths[1], paths[2])
    }

    /// The default `reputation.flood_threshold`: twice the most the limit
    /// admits in a second (its rate, or for a longer period its window).
    pub fn flood_threshold(q: &Quota) -> u32 {
        match q.per {
            Period::Second => q.rate.get(),
            Period::Minute | Period::Hour => q.window_limit.get(),
        }
        .saturating_mul(2)
    }

    /// Largest rate, burst or window limit: a window slot counts up to 2^24.
    pub const MAX_RATE: u32 = 10_000_000;

    /// Largest window limit: a client record counts a second's requests in
    /// 20 bits. An unset window limit is the rate, cut to this.
    pub const MAX_WINDOW: u32 = 1_000_000;
    /// Longest time the bucket may take to refill from empty (`burst` times
    /// `period / rate`): a client record keeps the bucket in 44 bits of
    /// nanoseconds.
    pub const MAX_REFILL_SECS: u64 = 4 * 3600;

    /// Checks that a quota's state fits a client record.
    pub fn fits_a_record(q: Quota, burst: &[Seg], window: &[Seg]) -> Result<Quota, Invalid> {
        if q.window_limit.get() > MAX_WINDOW {
            return Err(at(window, format!("must be between 1 and {MAX_WINDOW}")));
        }
        let most = u64::from(q.rate.get()) * MAX_REFILL_SECS / q.per.secs();
        if u64::from(q.burst.get()) > most {
            return Err(at(
                burst,
                format!("at most {most} at this rate: the bucket must refill within 4 hours"),
            ));
        }
        Ok(q)
    }

    pub fn nonzero(n: u32, path: &[Seg]) -> Result<NonZeroU32, Invalid> {
        match NonZeroU32::new(n) {
            Some(n) if n.get() <= MAX_RATE => Ok(n),
            _ => Err(at(path, format!("must be between 1 and {MAX_RATE}"))),
        }
    }

    pub fn percent(n: u8, path: &[Seg]) -> Result<u8, Invalid> {
        if n <= 100 {
            Ok(n)
        } else {
            Err(at(path, "must be between 0 and 100"))
        }
    }

    pub fn mode(s: &str, path: &[Seg]) -> Result<Mode, Invalid> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "shadow" => Ok(Mode::Shadow),
            other => Err(at(
                path,
                format!("unknown mode {other:?}; expected \"enforce\" or \"shadow\""),
            )),
        }
    }

    /// Parses `250ms`, `5s`, `2m`, `1h`.
    pub fn parse_duration(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (e.g. \"250ms\", \"5s\", \"2m\")"))?;
        let secs = |mul: u64| n.checked_mul(mul).map(Duration::from_secs);
        let d = match unit.trim() {
            "ms" => Some(Duration::from_millis(n)),
            "s" => secs(1),
            "m" => secs(60),
            "h" => secs(3600),
            _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
        };
        // A ceiling far past any sane setting: added to a clock, a longer
        // one would overflow instead of meaning "forever".
        const MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
        d.filter(|d| *d <= MAX)
            .ok_or_else(|| format!("{s:?} is too long (at most 100 years)"))
    }

    pub fn nanos(d: Duration) -> u64 {
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn duration(s: &str, path: &[Seg]) -> Result<Duration, Invalid> {
        match parse_duration(s) {
            Ok(d) if d.is_zero() => Err(at(path, "must be > 0")),
            Ok(d) => Ok(d),
            Err(m) => Err(at(path, m)),
        }
    }

    // ---------------------------------------------------------------------------
    // Finding keys in the source text.

    fn path_string(path: &[Seg]) -> String {
        let mut out = String::new();
        for seg in path {
            match seg {
                Seg::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                }
                Seg::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    fn line_col(src: &str, offset: usize) -> (usize, usize) {
        let before = &src[..offset.min(src.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    /// The span of the deepest part of `path` present in the document.
    fn span_of(src: &str, path: &[Seg]) -> Option<Range<usize>> {
        let doc = DeTable::parse(src).ok()?;
        let mut best = None;
        let mut value: &DeValue<'_> = &DeValue::Table(doc.get_ref().clone());
        for seg in path {
            let next = match (seg, value) {
                (Seg::Key(k), DeValue::Table(t)) => {
                    t.iter()
                        .find(|(key, _)| key.get_ref().as_ref() == *k)
                        .map(|(key, v)| {
                            // Point at the key itself for scalars, where the eye looks.
                            best = Some(key.span());
                            v
                        })
                }
                (Seg::Index(i), DeValue::Array(a)) => a.get(*i).inspect(|v| best = Some(v.span())),
                _ => None,
            };
            match next {
                Some(v) => value = v.get_ref(),
                None => break,
            }
        }
        best
    }

    /// The dotted key whose key or value contains byte `offset`.
    fn key_at(src: &str, offset: usize) -> Option<String> {
        let (doc, _) = DeTable::parse_recoverable(src);
        key_in_table(doc.get_ref(), offset)
    }

    fn key_in_table(table: &DeTable<'_>, offset: usize) -> Option<String> {
        for (key, value) in table.iter() {
            let name = key.get_ref().as_ref();
            if key.span().contains(&offset) {
                return Some(name.to_string());
            }
            // A `[table]`'s span covers only its header, so look inside anyway.
            let inner = match value.get_ref() {
                DeValue::Table(t) => key_in_table(t, offset).map(|k| format!("{name}.{k}")),
                DeValue::Array(a) => a.iter().enumerate().find_map(|(i, item)| match item.get_ref() {
                    DeValue::Table(t) => key_in_table(t, offset).map(|k| format!("{name}[{i}].{k}")),
                    _ => item.span().contains(&offset).then(|| format!("{name}[{i}]")),
                }),
                _ => None,
            };
            if inner.is_some() {
                return inner;
            }
            if value.span().contains(&offset) {
                return Some(name.to_string());
            }
        }
        None
    }
}
