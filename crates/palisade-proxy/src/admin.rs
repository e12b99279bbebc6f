//! The admin API: metrics, health, reputation and store inspection and
//! control.
//!
//! Reads on a loopback listener need no token; everything else needs
//! `Authorization: Bearer <token>`, except the `/healthz` and `/readyz`
//! probes. With no token configured, changes are refused outright.
//! `admin.metrics_listen`, when set, is a second listener that answers only
//! the metrics, without a token, so Prometheus need not hold the token.
//!
//! The listener is bounded like the proxy's: header and idle deadlines, a
//! connection cap (past it, the oldest connection with no request in
//! flight gives way, so holders of idle connections cannot lock operators
//! out), and a per-address throttle on failed token checks. A
//! `Host` that is neither an IP literal, `localhost` nor one of
//! `admin.allowed_hosts` is refused: a web page whose DNS name was rebound
//! to this address would otherwise read bans, scores and the feed URL.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use palisade_core::NANOS_PER_MS;
use palisade_limits::reputation::Explanation;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::Secret;
use crate::io::{ConnActivity, Deadlines, TimedIo};
use crate::proxy::{App, ReloadError, Runtime};
use crate::respond::text;

type Resp = Response<Full<Bytes>>;

/// What a listener answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The whole admin API.
    Admin,
    /// `GET admin.metrics_path` without a token, 404 for anything else.
    MetricsOnly,
}

/// Serves the admin API until `stop` flips.
pub async fn serve(listener: TcpListener, app: Arc<App>, stop: watch::Receiver<bool>) {
    serve_as(listener, app, stop, Role::Admin).await;
}

/// Serves only the metrics, without token, until `stop` flips
/// (`admin.metrics_listen`): Prometheus can scrape it without the admin
/// token, which opens everything else. Bounded like the admin listener
/// (same deadlines and cap, with a count of its own so a flood of
/// scrapers cannot lock operators out of the admin API).
pub async fn serve_metrics(listener: TcpListener, app: Arc<App>, stop: watch::Receiver<bool>) {
    serve_as(listener, app, stop, Role::MetricsOnly).await;
}

async fn serve_as(listener: TcpListener, app: Arc<App>, mut stop: watch::Receiver<bool>, role: Role) {
    let loopback = listener
        .local_addr()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false);
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let failures = Arc::new(AuthFailures::default());
    let open = Arc::new(Open::default());
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let rt = app.runtime();
                let cfg = &rt.config.admin;
                // Admin connections share the process's file descriptors with
                // the proxy: past the cap, when no connection can give way,
                // close before reading a byte.
                let Some(place) = open.admit(cfg.max_connections) else {
                    drop(stream);
                    continue;
                };
                let deadlines = Deadlines {
                    header: cfg.header_read_timeout,
                    idle: cfg.idle_timeout,
                    write: rt.config.server.write_timeout,
                    response_rate: crate::server::response_rate(&rt.config.server),
                };
                let app = app.clone();
                let builder = builder.clone();
                let failures = failures.clone();
                let local = stream.local_addr().ok();
                crate::tasks::spawn(async move {
                    // The metrics listener checks no token.
                    let who = match role {
                        Role::Admin => Who::of(local, peer),
                        Role::MetricsOnly => Who::Addr(peer.ip()),
                    };
                    let activity = place.held.activity.clone();
                    let io = TimedIo::new(stream, activity.clone(), deadlines);
                    let svc = hyper::service::service_fn(move |req| {
                        let app = app.clone();
                        let failures = failures.clone();
                        let busy = activity.begin();
                        async move {
                            let conn = Conn { who, loopback, failures: &failures };
                            let resp = match role {
                                Role::Admin => route(&app, &conn, req).await,
                                Role::MetricsOnly => metrics_only(&app, &req),
                            };
                            drop(busy);
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    // Dropping the connection closes it.
                    tokio::select! {
                        _ = builder.serve_connection(TokioIo::new(io), svc) => {}
                        () = place.held.evict.notified() => {}
                    }
                    drop(place);
                });
            }
        }
    }
}

/// The open connections of one listener, oldest first.
#[derive(Default)]
struct Open(Mutex<Vec<Arc<Held>>>);

/// One open connection.
#[derive(Default)]
struct Held {
    activity: Arc<ConnActivity>,
    /// Tells the connection to close: it gave way to a newer one.
    evict: Notify,
    evicted: AtomicBool,
}

impl Open {
    /// A place for a new connection under `max`. At the cap, the oldest
    /// connection with no request in flight is told to close and the new
    /// one takes its place: an idle keep-alive connection (or one still
    /// reading its head) costs its holder nothing to keep, so refusing
    /// newcomers instead would let whoever holds them all lock operators
    /// out. `None` when every connection is in the middle of a request.
    fn admit(self: &Arc<Self>, max: usize) -> Option<Place> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let staying = open.iter().filter(|h| !h.evicted.load(Ordering::Acquire)).count();
        if staying >= max {
            let victim = open
                .iter()
                .find(|h| !h.evicted.load(Ordering::Acquire) && h.activity.idle())?;
            victim.evicted.store(true, Ordering::Release);
            // Stored as a permit if the connection is not waiting yet.
            victim.evict.notify_one();
        }
        let held = Arc::new(Held::default());
        open.push(held.clone());
        Some(Place {
            open: self.clone(),
            held,
        })
    }
}

/// A connection's place in [`Open`], given back when dropped.
struct Place {
    open: Arc<Open>,
    held: Arc<Held>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.open.0.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|h| !Arc::ptr_eq(h, &self.held));
    }
}

/// What a request's handling needs to know about its connection.
struct Conn<'a> {
    /// Whom its failed token checks count against.
    who: Who,
    loopback: bool,
    failures: &'a AuthFailures,
}

/// Whom failed token checks count against: an address (IPv6 by /64), or,
/// for a client on this host, its user. Every local user connects from
/// 127.0.0.1, so counting by address let any of them lock the operator's
/// `palisade bans` out with ten wrong tokens a minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    Addr(IpAddr),
    LocalUser(u32),
}

impl Who {
    /// The user behind a loopback peer (one `sock_diag` lookup), else the
    /// peer's address.
    fn of(local: Option<std::net::SocketAddr>, peer: std::net::SocketAddr) -> Self {
        if peer.ip().is_loopback()
            && let Some(local) = local
            && let Ok(Some(uid)) = palisade_kernel::diag::owner(local, peer)
        {
            return Self::LocalUser(uid);
        }
        Self::Addr(aggregate(peer.ip()))
    }
}

/// How long a failed token check counts against its address.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once; past it newcomers share one strict counter.
const MAX_TRACKED: usize = 4096;

/// Failed token checks per address (IPv6 by /64) or local user in its
/// current minute.
#[derive(Default)]
struct AuthFailures(Mutex<HashMap<Who, (Instant, u32)>>);

impl AuthFailures {
    /// The wait before `who` may try a token again, if it is throttled.
    fn throttled(&self, who: Who, limit: u32, now: Instant) -> Option<Duration> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = Self::slot(&map, who);
        let &(since, count) = map.get(&key)?;
        let left = FAILURE_WINDOW.saturating_sub(now.saturating_duration_since(since));
        (count >= limit && !left.is_zero()).then_some(left)
    }

    fn record(&self, who: Who, now: Instant) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&who) {
            map.retain(|_, (since, _)| now.saturating_duration_since(*since) < FAILURE_WINDOW);
        }
        let key = Self::slot(&map, who);
        let entry = map.entry(key).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// `who`'s key, or the shared overflow key when the table is full: a
    /// flood of addresses cannot push a guesser out to start afresh.
    fn slot(map: &HashMap<Who, (Instant, u32)>, who: Who) -> Who {
        if map.len() >= MAX_TRACKED && !map.contains_key(&who) {
            Who::Addr(IpAddr::from([0u8; 16]))
        } else {
            who
        }
    }
}

/// IPv6 addresses by /64: one host owns a whole /64.
fn aggregate(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
    }
}

/// Whether `Host` names this listener: an IP literal, `localhost` or an
/// allowed name, with any port. A DNS-rebinding page always sends its own
/// name, and a request without `Host` is not HTTP/1.1.
fn host_allowed(req: &Request<Incoming>, allowed: &[String]) -> bool {
    let host = match req.uri().authority() {
        Some(a) => Some(a.host().to_owned()),
        None => {
            let mut all = req.headers().get_all(HOST).iter();
            match (all.next(), all.next()) {
                (Some(h), None) => h
                    .to_str()
                    .ok()
                    .and_then(|h| h.parse::<http::uri::Authority>().ok())
                    .map(|a| a.host().to_owned()),
                _ => None,
            }
        }
    };
    let Some(host) = host else {
        return false;
    };
    let host = host.to_ascii_lowercase();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok() || host == "localhost" || allowed.contains(&host)
}

async fn route(app: &App, conn: &Conn<'_>, req: Request<Incoming>) -> Resp {
    let rt = app.runtime();
    if !host_allowed(&req, &rt.config.admin.allowed_hosts) {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "Host must be an IP address, localhost or one of admin.allowed_hosts",
        );
    }
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let reading = method == Method::GET || method == Method::HEAD;
    // Probes reveal nothing and must work from a kubelet or load balancer.
    let probe = reading && matches!(path.as_str(), "/healthz" | "/readyz");
    // Profiles cost CPU and reveal internals: token even on loopback.
    let profiling = reading && path == "/debug/pprof/profile";
    if (!(reading && conn.loopback || probe) || profiling)
        && let Some(refusal) = refuse_unauthorized(&rt, conn, &req)
    {
        return refusal;
    }
    if profiling {
        return profile(app, req.uri().query().unwrap_or("")).await;
    }
    if path == rt.config.admin.metrics_path && reading {
        return metrics(app, &req);
    }
    match (path.as_str(), reading) {
        ("/healthz", true) => return text(StatusCode::OK, "ok\n"),
        ("/readyz", true) => {
            return if app.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            };
        }
        _ => {}
    }
    if let Some(ip) = path.strip_prefix("/api/v1/reputation/") {
        let Ok(ip) = ip.parse::<IpAddr>() else {
            return error(StatusCode::BAD_REQUEST, "not an IP address");
        };
        return reputation(app, &rt, &method, ip, req).await;
    }
    match (path.as_str(), &method) {
        ("/api/v1/breakers", &Method::GET) => return json(StatusCode::OK, &breakers(app, &rt)),
        ("/api/v1/pools", &Method::GET) => return json(StatusCode::OK, &pools(app, &rt)),
        ("/syn-stats", &Method::GET) => {
            return match app.syn() {
                Some(d) => json(StatusCode::OK, &d.stats_json()),
                None => error(StatusCode::NOT_FOUND, "SYN defense is off (syn.enabled)"),
            };
        }
        ("/api/v1/bans", &Method::GET) => {
            return match app.syn() {
                Some(d) => json(
                    StatusCode::OK,
                    &serde_json::to_value(d.bans()).unwrap_or_default(),
                ),
                None => error(StatusCode::NOT_FOUND, "SYN defense is off (syn.enabled)"),
            };
        }
        ("/api/v1/bans", &Method::POST) => return ban(app, req).await,
        ("/api/v1/cluster", &Method::GET) => {
            return match &app.cluster {
                Some(c) => json(
                    StatusCode::OK,
                    &serde_json::to_value(c.status()).unwrap_or_default(),
                ),
                None => error(StatusCode::NOT_FOUND, "not in cluster mode (cluster.redis)"),
            };
        }
        ("/api/v1/store", &Method::GET) => {
            return match store_json(&rt) {
                Some(v) => json(StatusCode::OK, &v),
                None => error(StatusCode::NOT_FOUND, "no store configured (store.path)"),
            };
        }
        ("/api/v1/store/delta" | "/api/v1/store/reload", &Method::POST) => {
            return store_update(app, &rt, &path, req).await;
        }
        ("/api/v1/reload", &Method::POST) => {
            return match app.reload().await {
                Ok(report) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "reloaded": true, "needs_restart": report.needs_restart }),
                ),
                Err(e @ ReloadError::NoFile) => error(StatusCode::CONFLICT, &e.to_string()),
                Err(e) => json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &serde_json::json!({ "reloaded": false, "error": e.to_string() }),
                ),
            };
        }
        _ => {}
    }
    if let Some(net) = path.strip_prefix("/api/v1/bans/")
        && method == Method::DELETE
    {
        let Some(d) = app.syn() else {
            return error(StatusCode::NOT_FOUND, "SYN defense is off (syn.enabled)");
        };
        let Ok(net) = parse_net(net) else {
            return error(StatusCode::BAD_REQUEST, "not an IP address or CIDR");
        };
        return match d.unban_shared(net).await {
            Ok(true) => json(StatusCode::OK, &serde_json::json!({ "unbanned": net })),
            Ok(false) => error(StatusCode::NOT_FOUND, "not banned"),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        };
    }
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

/// The metrics listener: the exposition and nothing else, not even the
/// probes (they belong to the admin listener, which the kubelet reaches).
fn metrics_only(app: &App, req: &Request<Incoming>) -> Resp {
    let rt = app.runtime();
    if !host_allowed(req, &rt.config.admin.allowed_hosts) {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "Host must be an IP address, localhost or one of admin.allowed_hosts",
        );
    }
    let reading = req.method() == Method::GET || req.method() == Method::HEAD;
    if reading && req.uri().path() == rt.config.admin.metrics_path {
        metrics(app, req)
    } else {
        error(StatusCode::NOT_FOUND, "no such endpoint")
    }
}

/// The exposition, in OpenMetrics when the scraper asks for it (Prometheus
/// does), else in the Prometheus text format that every reader knows.
fn metrics(app: &App, req: &Request<Incoming>) -> Resp {
    let openmetrics = req.headers().get_all(ACCEPT).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.contains("application/openmetrics-text"))
    });
    app.refresh_gauges();
    let mut r = Response::new(Full::new(Bytes::from(app.metrics.encode(openmetrics))));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(if openmetrics {
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        } else {
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE
        }),
    );
    r
}

fn parse_net(s: &str) -> Result<ipnet::IpNet, ()> {
    // `/` in a path arrives percent-encoded or as a path segment.
    let s = s.replace("%2F", "/").replace("%2f", "/");
    let net = s
        .parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(drop)?;
    // `::ffff:a.b.c.d/n` is the IPv4 network it maps: otherwise it escapes
    // the IPv4 minimum prefix, and neither the kernel's IPv4 rule nor the
    // check at accept (which sees IPv4 clients as IPv4) would hold it.
    Ok(match net {
        ipnet::IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(a) => ipnet::IpNet::new(IpAddr::V4(a), n.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        _ => net,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBan {
    ip: String,
    #[serde(default)]
    duration: Option<String>,
}

async fn ban(app: &App, req: Request<Incoming>) -> Resp {
    let Some(d) = app.syn() else {
        return error(StatusCode::NOT_FOUND, "SYN defense is off (syn.enabled)");
    };
    let body = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "body unreadable or over 4096 bytes"),
    };
    let new: NewBan = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"ip\": \"ADDR or CIDR\", \"duration\": \"10m\"}}: {e}"),
            );
        }
    };
    let Ok(net) = parse_net(&new.ip) else {
        return error(StatusCode::BAD_REQUEST, "ip: not an IP address or CIDR");
    };
    let ttl = match new.duration.as_deref() {
        None => app
            .runtime()
            .config
            .syn
            .as_ref()
            .map_or(Duration::from_secs(600), |s| s.ban_duration),
        Some(text) => match crate::config::parse_duration(text) {
            Ok(t) if !t.is_zero() => t,
            Ok(_) => return error(StatusCode::BAD_REQUEST, "duration: must be > 0"),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("duration: {e} (e.g. \"30s\", \"10m\", \"1h\")"),
                );
            }
        },
    };
    match d.ban(net, ttl).await {
        Ok(()) => {
            tracing::info!(%net, seconds = ttl.as_secs(), "banned by admin");
            json(
                StatusCode::OK,
                &serde_json::json!({ "banned": net.trunc(), "seconds": ttl.as_secs() }),
            )
        }
        Err(e) if e.is_refusal() => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The refusal for a request without the right bearer token, if any.
fn refuse_unauthorized(rt: &Runtime, conn: &Conn<'_>, req: &Request<Incoming>) -> Option<Resp> {
    let cfg = &rt.config.admin;
    let Some(token) = cfg.token.as_ref().map(Secret::expose) else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "no admin token configured: set PALISADE_ADMIN_TOKEN or admin.token",
        ));
    };
    let now = Instant::now();
    // Checked before the token, so a guesser learns nothing more once throttled.
    if let Some(wait) = conn.failures.throttled(conn.who, cfg.max_auth_failures, now) {
        let mut r = error(StatusCode::TOO_MANY_REQUESTS, "too many failed token checks");
        if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            r.headers_mut().insert(RETRY_AFTER, v);
        }
        return Some(r);
    }
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        None
    } else {
        conn.failures.record(conn.who, now);
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        Some(r)
    }
}

/// The credentials of a `Bearer` authorization; the scheme name is
/// case-insensitive (RFC 9110 §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_matches(' '))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetScore {
    score: u8,
}

async fn profile(app: &App, query: &str) -> Resp {
    let mut seconds = 10;
    let mut format = crate::profile::Format::Pprof;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("seconds", v)) => match v.parse::<u64>() {
                Ok(n @ 1..=crate::profile::MAX_SECONDS) => seconds = n,
                _ => return error(StatusCode::BAD_REQUEST, "seconds must be 1-60"),
            },
            Some(("format", "svg")) => format = crate::profile::Format::Svg,
            Some(("format", "pprof" | "pb")) => format = crate::profile::Format::Pprof,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "parameters: seconds=1-60, format=pprof|svg",
                );
            }
        }
    }
    if app.profiling.swap(true, Ordering::AcqRel) {
        return error(StatusCode::CONFLICT, "a profile is already being taken");
    }
    let result = crate::profile::collect(seconds, format).await;
    app.profiling.store(false, Ordering::Release);
    match result {
        Ok(bytes) => {
            let mut r = Response::new(Full::new(Bytes::from(bytes)));
            let (ctype, name) = match format {
                crate::profile::Format::Svg => ("image/svg+xml", "profile.svg"),
                crate::profile::Format::Pprof => ("application/octet-stream", "profile.pb"),
            };
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
            if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
                r.headers_mut().insert(http::header::CONTENT_DISPOSITION, v);
            }
            r
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

/// Each pool with each member's weight, health and breaker state.
fn pools(app: &App, rt: &Runtime) -> serde_json::Value {
    let now = app.now();
    let pools: Vec<_> = rt
        .pools
        .iter()
        .zip(&rt.config.pools)
        .map(|(pool, cfg)| {
            let members: Vec<_> = pool
                .members
                .iter()
                .map(|m| {
                    let breaker = m
                        .upstream
                        .breaker
                        .as_ref()
                        .map_or("disabled", |b| b.state(now).0.as_str());
                    let mut v = serde_json::json!({
                        "member": m.upstream.label,
                        "weight": m.weight,
                        "breaker": breaker,
                    });
                    let health = match &m.health {
                        Some(h) => {
                            let t = h.tally();
                            serde_json::json!({
                                "state": if t.up { "up" } else { "down" },
                                "consecutive_successes": t.successes,
                                "consecutive_failures": t.failures,
                                "checks_passed": t.passed,
                                "checks_failed": t.failed,
                                "last_error": t.last_error,
                            })
                        }
                        None => serde_json::json!({ "state": "unchecked" }),
                    };
                    v["health"] = health;
                    v
                })
                .collect();
            let check = cfg.health_check.as_ref().map(|h| {
                serde_json::json!({
                    "path": h.path.as_str(),
                    "interval_ms": h.interval.as_millis(),
                    "timeout_ms": h.timeout.as_millis(),
                    "expect_status": h.expect_status.as_u16(),
                    "rise": h.rise.get(),
                    "fall": h.fall.get(),
                })
            });
            serde_json::json!({ "name": pool.name, "health_check": check, "members": members })
        })
        .collect();
    serde_json::json!({ "pools": pools })
}

fn breakers(app: &App, rt: &Runtime) -> serde_json::Value {
    let now = app.now();
    let upstreams: Vec<_> = rt
        .upstreams
        .iter()
        .map(|u| match &u.breaker {
            Some(b) => {
                let (state, counts, _) = b.state(now);
                serde_json::json!({
                    "upstream": u.label,
                    "state": state.as_str(),
                    "requests": counts.requests,
                    "successes": counts.successes,
                    "failures": counts.failures,
                })
            }
            None => serde_json::json!({ "upstream": u.label, "state": "disabled" }),
        })
        .collect();
    let clients = rt.shield.adaptive().map(|a| {
        let counts: serde_json::Map<String, serde_json::Value> = a
            .state_counts()
            .iter()
            .map(|(state, n)| (state.as_str().to_string(), serde_json::json!(n)))
            .collect();
        let troubled: Vec<_> = a
            .troubled(100, now)
            .into_iter()
            .map(|(ip, state, requests, rate)| {
                serde_json::json!({
                    "ip": ip.to_string(),
                    "state": state.as_str(),
                    "requests": requests,
                    "failure_rate": (rate * 1000.0).round() / 1000.0,
                })
            })
            .collect();
        serde_json::json!({ "counts": counts, "clients": troubled })
    });
    serde_json::json!({ "upstreams": upstreams, "adaptive": clients })
}

async fn reputation(app: &App, rt: &Runtime, method: &Method, ip: IpAddr, req: Request<Incoming>) -> Resp {
    let Some(rep) = rt.shield.reputation() else {
        return error(StatusCode::NOT_FOUND, "reputation is disabled");
    };
    let key = rt.shield.key_for_ip(ip);
    let now = app.now();
    match *method {
        Method::GET | Method::HEAD => {}
        Method::PUT => {
            let body = match Limited::new(req.into_body(), 4096).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return error(StatusCode::BAD_REQUEST, "body unreadable or over 4096 bytes");
                }
            };
            let set: SetScore = match serde_json::from_slice(&body) {
                Ok(s) => s,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("expected {{\"score\": 0-100}}: {e}"),
                    );
                }
            };
            if set.score > 100 {
                return error(StatusCode::BAD_REQUEST, "score must be 0-100");
            }
            rep.set(&key, set.score, now);
            tracing::info!(%ip, score = set.score, "reputation set by admin");
            let entry = crate::state::entry_for(rep, &key, rt.config.shield.ipv6_prefix, now);
            if let Some(e) = entry {
                app.share(e);
            }
            if let Some(refusal) = persist(app, entry).await {
                return refusal;
            }
        }
        Method::DELETE => {
            rep.reset(&key);
            tracing::info!(%ip, "reputation reset by admin");
            if let Some(refusal) =
                persist(app, crate::state::cleared(&key, rt.config.shield.ipv6_prefix)).await
            {
                return refusal;
            }
        }
        _ => return error(StatusCode::METHOD_NOT_ALLOWED, "use GET, PUT or DELETE"),
    }
    let listed = rt.shield.config().store.as_ref().and_then(|cell| {
        let snap = cell.load();
        snap.lookup(ip, palisade_core::unix_now()).map(|v| {
            serde_json::json!({
                "score": v.score,
                "action": v.action.as_str(),
                "reason": snap.reason(v.reason),
                "expires": v.expires,
            })
        })
    });
    let mut body = explain_json(ip, &rep.explain(&key, now), now, rep.config().block_below);
    body["store"] = listed.unwrap_or(serde_json::Value::Null);
    body["durable"] = serde_json::Value::Bool(app.state().is_some());
    json(StatusCode::OK, &body)
}

/// Writes an operator's change to the durable log and waits for the fsync;
/// the error response when that fails (the change holds in memory only).
async fn persist(app: &App, entry: Option<palisade_store::LogEntry>) -> Option<Resp> {
    let (Some(state), Some(entry)) = (app.state(), entry) else {
        return None;
    };
    match state.record(vec![entry]).await {
        Ok(()) => None,
        Err(e) => Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("applied in memory but not persisted: {e}"),
        )),
    }
}

fn store_json(rt: &Runtime) -> Option<serde_json::Value> {
    let cell = rt.shield.config().store.as_ref()?;
    let info = cell.load().info();
    let status = cell.status();
    let settings = rt.config.store.as_ref();
    let feed = settings
        .and_then(|s| s.feed.as_ref())
        .map(crate::feed::source_name);
    Some(serde_json::json!({
        "path": info.source,
        "watermark": info.watermark,
        "created_unix": info.created_unix,
        "entries": info.entries(),
        "ipv4": info.ipv4,
        "ipv4_prefixes": info.ipv4_prefixes,
        "ipv6": info.ipv6,
        "ipv6_prefixes": info.ipv6_prefixes,
        "verdicts": info.classes,
        "bytes": info.bytes,
        "filter_bytes": info.filter_bytes,
        "feed": {
            "source": feed,
            "public_key": settings.and_then(|s| s.feed_public_key).map(|k| k.to_string()),
            "poll_interval_secs": settings.map(|s| s.poll_interval.as_secs_f64()),
            "applied": status.applied,
            "rejected": status.rejected,
            "swaps": status.swaps,
            "last_error": status.last_error,
        },
    }))
}

async fn store_update(app: &App, rt: &Runtime, path: &str, req: Request<Incoming>) -> Resp {
    let Some(cell) = rt.shield.config().store.clone() else {
        return error(StatusCode::NOT_FOUND, "no store configured (store.path)");
    };
    let result = if path == "/api/v1/store/reload" {
        crate::feed::reload(cell, &app.metrics).await
    } else {
        // Not signature-checked: this endpoint already needs the admin
        // token, and a token holder can do more than any delta.
        let body = match Limited::new(req.into_body(), 512 << 20).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body unreadable or over 512 MiB"),
        };
        let Ok(text) = String::from_utf8(body.to_vec()) else {
            return error(StatusCode::BAD_REQUEST, "the delta is not UTF-8");
        };
        crate::feed::apply(cell, &app.metrics, text, "admin API".into())
            .await
            .map(|_| ())
            .map_err(|e| e.message)
    };
    match result {
        Ok(()) => json(StatusCode::OK, &store_json(rt).unwrap_or_default()),
        Err(e) if e.contains("does not follow watermark") => error(StatusCode::CONFLICT, &e),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
    }
}

fn explain_json(ip: IpAddr, e: &Explanation, now: u64, block_below: u8) -> serde_json::Value {
    serde_json::json!({
        "ip": ip.to_string(),
        "score": (e.score * 1000.0).round() / 1000.0,
        "blocked": e.score < f64::from(block_below),
        "events": e.events.iter().map(|ev| serde_json::json!({
            "kind": ev.kind.as_str(),
            "delta": ev.delta,
            "score_after": ev.score_after,
            "age_ms": now.saturating_sub(ev.at) / NANOS_PER_MS,
        })).collect::<Vec<_>>(),
    })
}

fn json(status: StatusCode, v: &serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: &str) -> Resp {
    json(status, &serde_json::json!({ "error": message }))
}
