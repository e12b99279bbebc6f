//! Active health checks: each member of a pool with `health_check` is asked
//! `GET path` by a task of its own, one check at a time, each bounded by
//! `timeout`, the next starting `interval` after the last one started.
//! `fall` failures in a row take the member out of rotation (and open its
//! breaker); `rise` successes in a row bring it back (and half-open the
//! breaker, so probes decide the rest).
//!
//! The checks are Palisade's own requests, on a client of their own: no
//! client request, header or answer enters them, and client traffic
//! filling the upstream connection cap cannot make them fail. What a
//! client can do to a member through Palisade (make it answer 5xx) reaches
//! only the passive breaker.
//!
//! Timing is tokio's: tests pause time and step it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, USER_AGENT};
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use palisade_core::Clock;
use palisade_limits::breaker::Breaker;

use crate::clock::TokioClock;
use crate::config::{Config, HealthCheckConfig};
use crate::connector::{CappedConnector, Protocol};
use crate::metrics::{BreakerFamilies, HealthFamilies, MemberLabels, Metrics};
use crate::proxy::Runtime;
use crate::upstream_tls::failure_in_chain;

/// Longest `last_error` kept, in bytes.
const MAX_ERROR_BYTES: usize = 200;

/// Most of a check's answer read (so its connection can be reused); past
/// it the connection is dropped, the check still judged by its status.
const MAX_BODY_BYTES: usize = 64 << 10;

/// One pool member's checks: whether it is in rotation, and why.
pub struct Health {
    /// The pool's name.
    pub pool: &'static str,
    /// The member's `host:port`.
    pub member: &'static str,
    up: AtomicBool,
    tally: Mutex<Tally>,
    check: Mutex<Arc<Check>>,
}

/// What a check asks and how it is judged.
pub struct Check {
    /// The pool's `health_check`.
    pub config: HealthCheckConfig,
    probe: Arc<dyn Probe>,
}

/// Asks a member once.
pub trait Probe: Send + Sync {
    /// `Ok` for a healthy answer, else why not.
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// A member's recent checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    /// In rotation.
    pub up: bool,
    /// Successes in a row (0 after a failure).
    pub successes: u32,
    /// Failures in a row (0 after a success).
    pub failures: u32,
    /// Checks that succeeded, ever.
    pub passed: u64,
    /// Checks that failed, ever.
    pub failed: u64,
    /// Why the last failed check failed.
    pub last_error: Option<String>,
}

impl Default for Tally {
    /// Up: a member is in rotation until its checks say otherwise, so a
    /// start or reload does not wait `rise` checks to serve.
    fn default() -> Self {
        Self {
            up: true,
            successes: 0,
            failures: 0,
            passed: 0,
            failed: 0,
            last_error: None,
        }
    }
}

impl Tally {
    /// Counts one check; returns the new state when it changes.
    pub fn record(&mut self, result: Result<(), String>, rise: u32, fall: u32) -> Option<bool> {
        match result {
            Ok(()) => {
                self.passed += 1;
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                if !self.up && self.successes >= rise {
                    self.up = true;
                    return Some(true);
                }
            }
            Err(why) => {
                self.failed += 1;
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                self.last_error = Some(truncate(why));
                if self.up && self.failures >= fall {
                    self.up = false;
                    return Some(false);
                }
            }
        }
        None
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl Health {
    /// A member in rotation, to be checked by `check`.
    pub fn new(pool: &'static str, member: &'static str, check: Check) -> Self {
        Self {
            pool,
            member,
            up: AtomicBool::new(true),
            tally: Mutex::new(Tally::default()),
            check: Mutex::new(Arc::new(check)),
        }
    }

    /// Whether the member is in rotation (read on every request: no lock).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Its checks so far.
    pub fn tally(&self) -> Tally {
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The check in force.
    pub fn check(&self) -> Arc<Check> {
        self.check.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces what is checked (a reload), keeping the state and counts.
    pub fn set_check(&self, check: Check) {
        *self.check.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(check);
    }

    /// Counts a check's result; returns the new state when it changes.
    fn record(&self, result: Result<(), String>, config: &HealthCheckConfig) -> Option<bool> {
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        let changed = tally.record(result, config.rise.get(), config.fall.get());
        if let Some(up) = changed {
            self.up.store(up, Ordering::Release);
        }
        changed
    }

    fn labels(&self) -> MemberLabels {
        MemberLabels {
            pool: self.pool,
            member: self.member,
        }
    }
}

impl Check {
    /// A check asking `probe`.
    pub fn new(config: HealthCheckConfig, probe: Arc<dyn Probe>) -> Self {
        Self { config, probe }
    }
}

/// Where a member's checks report: metrics, and its breaker.
#[derive(Clone)]
pub struct Report {
    /// Member gauges and check counters.
    pub health: HealthFamilies,
    /// Breaker transitions (a member taken out opens its breaker).
    pub breakers: BreakerFamilies,
    /// The member's breaker, when breakers are on.
    pub breaker: Option<Arc<Breaker>>,
    /// The breaker's `upstream` label.
    pub upstream: &'static str,
    /// The daemon's clock, for the breaker.
    pub clock: TokioClock,
}

/// Checks the member until its [`Health`] is dropped (the member left the
/// config): one check at a time, each cut at the check's timeout, the next
/// starting an interval after the last one started (or at once, if the
/// last took that long).
pub async fn run(health: Weak<Health>, report: Report) {
    loop {
        let Some(check) = health.upgrade().map(|h| h.check()) else {
            return;
        };
        let started = tokio::time::Instant::now();
        let timeout = check.config.timeout;
        let result = match tokio::time::timeout(timeout, check.probe.check()).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {}", show(timeout))),
        };
        let Some(h) = health.upgrade() else {
            return;
        };
        let labels = h.labels();
        let ok = result.is_ok();
        report
            .health
            .checks
            .get_or_create(&crate::metrics::CheckLabels {
                pool: h.pool,
                member: h.member,
                result: if ok { "success" } else { "failure" },
            })
            .inc();
        let why = result.as_ref().err().cloned();
        match h.record(result, &check.config) {
            Some(false) => {
                tracing::warn!(
                    pool = h.pool,
                    member = h.member,
                    error = why.as_deref().unwrap_or(""),
                    failures = check.config.fall.get(),
                    "upstream member down: out of rotation"
                );
                if let Some(b) = &report.breaker
                    && let Some(t) = b.trip(report.clock.now())
                {
                    report.breakers.record(report.upstream, t);
                }
            }
            Some(true) => {
                tracing::warn!(
                    pool = h.pool,
                    member = h.member,
                    successes = check.config.rise.get(),
                    "upstream member up: back in rotation"
                );
                if let Some(b) = &report.breaker
                    && let Some(t) = b.recover(report.clock.now())
                {
                    report.breakers.record(report.upstream, t);
                }
            }
            None => {}
        }
        report
            .health
            .member_up
            .get_or_create(&labels)
            .set(i64::from(h.is_up()));
        drop(h);
        tokio::time::sleep_until(started + check.config.interval).await;
    }
}

fn show(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The client checks go out on: its own connections, apart from the
/// forwarding pool and its cap, so client traffic cannot crowd them out.
pub type CheckClient = Client<CappedConnector, Empty<Bytes>>;

/// The clients checks go out on (HTTP/1.1 and HTTP/2): their own
/// connections, apart from the forwarding pool and its cap, so client
/// traffic cannot crowd them out.
pub fn clients(config: &Config) -> (CheckClient, CheckClient) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.upstream.connect_timeout));
    connector.set_nodelay(true);
    // One check in flight per member of each pool: an upstream in every
    // pool needs as many connections as there are pools.
    let per_upstream = config.pools.len().max(1);
    let mut capped = CappedConnector::new(connector, per_upstream);
    if let Some(tls) = &config.upstream.tls {
        capped = capped.with_tls(tls.clone(), config.upstream.connect_timeout);
    }
    let h2 = capped.for_h2();
    let http1 = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(config.upstream.pool_idle_timeout)
        .pool_max_idle_per_host(per_upstream)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(capped);
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_idle_timeout(config.upstream.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(h2);
    (http1, h2)
}

/// Gives each member of a pool with `health_check` its checks: the
/// previous runtime's for a member that stays in its pool (state, counts
/// and task carry on, under the new settings), else new ones, in rotation,
/// with a task of their own. A member whose pool loses its checks, or that
/// leaves, loses them: its task ends at its next wake.
pub fn attach(rt: &mut Runtime, previous: Option<&Runtime>, metrics: &Metrics, clock: TokioClock) {
    if rt.config.pools.iter().all(|p| p.health_check.is_none()) {
        return;
    }
    let (http1, h2) = clients(&rt.config);
    for (pool, cfg) in rt.pools.iter_mut().zip(&rt.config.pools) {
        let Some(hc) = &cfg.health_check else {
            continue;
        };
        let old_pool = previous.and_then(|p| p.pools.iter().find(|o| o.name == pool.name));
        for member in &mut pool.members {
            let u = &member.upstream;
            let client = if u.protocol == Protocol::H2 { &h2 } else { &http1 };
            let Some(probe) = HttpProbe::new(&u.scheme, &u.authority, hc, client.clone()) else {
                continue;
            };
            let check = Check::new(hc.clone(), Arc::new(probe));
            let kept = old_pool
                .and_then(|o| {
                    o.members.iter().find(|m| {
                        m.upstream.authority == u.authority
                            && m.upstream.scheme == u.scheme
                            && m.upstream.protocol == u.protocol
                    })
                })
                .and_then(|m| m.health.clone());
            let health = match kept {
                Some(h) => {
                    h.set_check(check);
                    h
                }
                None => {
                    let h = Arc::new(Health::new(pool.name, u.label, check));
                    metrics.health_families().member(pool.name, u.label, true);
                    crate::tasks::spawn(run(
                        Arc::downgrade(&h),
                        Report {
                            health: metrics.health_families(),
                            breakers: metrics.breaker_families(),
                            breaker: u.breaker.clone(),
                            upstream: u.label,
                            clock,
                        },
                    ));
                    h
                }
            };
            member.health = Some(health);
        }
    }
}

/// Drops the series of members `previous` checked that `rt` does not.
pub fn forget_gone(rt: &Runtime, previous: &Runtime, metrics: &Metrics) {
    let checked = |r: &Runtime| -> Vec<(&'static str, &'static str)> {
        r.pools
            .iter()
            .flat_map(|p| {
                p.members
                    .iter()
                    .filter_map(|m| m.health.as_ref().map(|h| (h.pool, h.member)))
            })
            .collect()
    };
    let now = checked(rt);
    for gone in checked(previous).into_iter().filter(|m| !now.contains(m)) {
        metrics.health_families().forget(gone.0, gone.1);
    }
}

/// `GET path` to a member over HTTP(S).
pub struct HttpProbe {
    uri: Uri,
    host: HeaderValue,
    expect: StatusCode,
    client: CheckClient,
}

impl HttpProbe {
    /// Asks `scheme://authority` for `config.path`.
    pub fn new(
        scheme: &Scheme,
        authority: &Authority,
        config: &HealthCheckConfig,
        client: CheckClient,
    ) -> Option<Self> {
        let uri = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query(config.path.clone())
            .build()
            .ok()?;
        Some(Self {
            uri,
            host: HeaderValue::from_str(authority.as_str()).ok()?,
            expect: config.expect_status,
            client,
        })
    }
}

impl Probe for HttpProbe {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let mut req = Request::new(Empty::new());
            *req.uri_mut() = self.uri.clone();
            req.headers_mut().insert(HOST, self.host.clone());
            req.headers_mut()
                .insert(USER_AGENT, HeaderValue::from_static("palisade-health-check"));
            let resp = self.client.request(req).await.map_err(|e| {
                if let Some((_, detail)) = failure_in_chain(&e) {
                    format!("TLS: {detail}")
                } else if e.is_connect() {
                    format!(
                        "connect: {}",
                        std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string())
                    )
                } else {
                    e.to_string()
                }
            })?;
            let status = resp.status();
            // Read so the connection is reused; a body past the bound
            // costs only its connection.
            let _ = Limited::new(resp.into_body(), MAX_BODY_BYTES).collect().await;
            if status == self.expect {
                Ok(())
            } else {
                Err(format!(
                    "status {} (expected {})",
                    status.as_u16(),
                    self.expect.as_u16()
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::sync::atomic::{AtomicU32, AtomicUsize};

    use palisade_limits::breaker::{BreakerConfig, BreakerState};

    use super::*;

    #[test]
    fn fall_failures_in_a_row_take_it_out_and_rise_successes_bring_it_back() {
        let mut t = Tally::default();
        let fail = || Err("status 503 (expected 200)".to_string());
        assert_eq!(t.record(fail(), 2, 3), None);
        assert_eq!(t.record(fail(), 2, 3), None);
        // A success between failures starts the count again.
        assert_eq!(t.record(Ok(()), 2, 3), None);
        assert_eq!(t.record(fail(), 2, 3), None);
        assert_eq!(t.record(fail(), 2, 3), None);
        assert_eq!(t.record(fail(), 2, 3), Some(false));
        assert_eq!(t.record(fail(), 2, 3), None, "already down");
        assert_eq!((t.up, t.failures, t.failed, t.passed), (false, 4, 6, 1));
        assert_eq!(t.last_error.as_deref(), Some("status 503 (expected 200)"));
        assert_eq!(t.record(Ok(()), 2, 3), None);
        assert_eq!(t.record(fail(), 2, 3), None);
        assert_eq!(t.record(Ok(()), 2, 3), None);
        assert_eq!(t.record(Ok(()), 2, 3), Some(true));
        assert_eq!((t.up, t.successes, t.failures), (true, 2, 0));
    }

    #[test]
    fn a_long_error_is_cut_on_a_character_boundary() {
        let mut t = Tally::default();
        t.record(Err("é".repeat(150)), 1, 1);
        let e = t.last_error.unwrap();
        assert!(e.len() <= MAX_ERROR_BYTES && e.chars().all(|c| c == 'é'), "{e}");
    }

    /// Answers as `healthy` says, after `delay` (forever: `None`),
    /// counting checks and the most in flight at once.
    struct Scripted {
        healthy: AtomicBool,
        delay: Mutex<Option<Duration>>,
        started: AtomicU32,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
    }

    impl Probe for Scripted {
        fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
            Box::pin(async move {
                self.started.fetch_add(1, Ordering::SeqCst);
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.most_in_flight.fetch_max(now, Ordering::SeqCst);
                struct Leave<'a>(&'a AtomicUsize);
                impl Drop for Leave<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _leave = Leave(&self.in_flight);
                let delay = *self.delay.lock().unwrap();
                match delay {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
                if self.healthy.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("status 503 (expected 200)".into())
                }
            })
        }
    }

    fn config() -> HealthCheckConfig {
        HealthCheckConfig {
            path: "/healthz".parse().unwrap(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            expect_status: StatusCode::OK,
            rise: NonZeroU32::new(2).unwrap(),
            fall: NonZeroU32::new(3).unwrap(),
        }
    }

    /// Lets the checker run whatever is due now.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn checks_take_a_failing_member_out_open_its_breaker_and_bring_it_back() {
        let probe = Arc::new(Scripted {
            healthy: AtomicBool::new(true),
            delay: Mutex::new(Some(Duration::from_millis(10))),
            started: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        });
        let health = Arc::new(Health::new(
            "api",
            "10.0.0.1:80",
            Check::new(config(), probe.clone()),
        ));
        let metrics = Metrics::new();
        let clock = TokioClock::new();
        let breaker = Arc::new(Breaker::new(BreakerConfig::default(), clock.now()));
        let report = Report {
            health: metrics.health_families(),
            breakers: metrics.breaker_families(),
            breaker: Some(breaker.clone()),
            upstream: "10.0.0.1:80",
            clock,
        };
        tokio::spawn(run(Arc::downgrade(&health), report));
        // The first check starts at once, the next ones every 2 s.
        settle().await;
        assert_eq!(probe.started.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(health.tally().passed, 1);
        probe.healthy.store(false, Ordering::SeqCst);
        // Checks at 2 s, 4 s, 6 s fail; the third takes it out.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(health.is_up(), "two failures: still in rotation");
        assert_eq!(breaker.state(clock.now()).0, BreakerState::Closed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!health.is_up());
        assert_eq!(health.tally().failures, 3);
        assert_eq!(
            breaker.state(clock.now()).0,
            BreakerState::Open,
            "fed to the breaker"
        );
        let text = metrics.encode(false);
        assert!(
            text.contains("palisade_upstream_member_up{pool=\"api\",member=\"10.0.0.1:80\"} 0"),
            "{text}"
        );
        assert!(
            text.contains(
                "palisade_upstream_health_checks_total{pool=\"api\",member=\"10.0.0.1:80\",result=\"failure\"} 3"
            ),
            "{text}"
        );
        probe.healthy.store(true, Ordering::SeqCst);
        // 8 s: one success, not enough; 10 s: the second brings it back
        // and half-opens the breaker for its probes.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!health.is_up());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(health.is_up());
        assert_eq!(breaker.state(clock.now()).0, BreakerState::HalfOpen);
        assert_eq!(probe.started.load(Ordering::SeqCst), 6);
        // Dropped with its member: the checks stop.
        drop(health);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(probe.started.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_that_never_answers_has_one_check_in_flight_cut_at_the_timeout() {
        let probe = Arc::new(Scripted {
            healthy: AtomicBool::new(true),
            delay: Mutex::new(None),
            started: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        });
        let health = Arc::new(Health::new(
            "api",
            "10.0.0.1:80",
            Check::new(config(), probe.clone()),
        ));
        let metrics = Metrics::new();
        let report = Report {
            health: metrics.health_families(),
            breakers: metrics.breaker_families(),
            breaker: None,
            upstream: "10.0.0.1:80",
            clock: TokioClock::new(),
        };
        tokio::spawn(run(Arc::downgrade(&health), report));
        // 20 s: checks at 0, 2, ..., 18 s, each cut at 1 s.
        tokio::time::sleep(Duration::from_millis(19_500)).await;
        assert_eq!(probe.started.load(Ordering::SeqCst), 10);
        assert_eq!(probe.most_in_flight.load(Ordering::SeqCst), 1);
        let t = health.tally();
        assert_eq!((t.up, t.failed), (false, 10));
        assert_eq!(t.last_error.as_deref(), Some("no answer within 1s"));
        // A check slower than the interval (the timeout raised by a
        // reload) delays the next one; it never overlaps it.
        *probe.delay.lock().unwrap() = Some(Duration::from_millis(2500));
        health.set_check(Check::new(
            HealthCheckConfig {
                timeout: Duration::from_secs(3),
                ..config()
            },
            probe.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(probe.most_in_flight.load(Ordering::SeqCst), 1);
        assert!(health.is_up(), "two successes brought it back");
    }
}
