//! Listeners, connection tasks and graceful shutdown.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use palisade_core::proxy_protocol::ProxyHeader;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;

use palisade_limits::adaptive::Signal;
use palisade_limits::admission::{Permit, Refusal};

use crate::admin;
use crate::body::MinRate;
use crate::config::Config;
use crate::config::WatchdogSettings;
use crate::hello::Recorded;
use crate::io::{ConnActivity, Deadlines, Expired, TimedIo};
use crate::maintenance::MaintenancePage;
use crate::metrics::{KindLabel, Metrics};
use crate::proxy::{App, ClientConn, ConfigSource, ProxyService, Runtime, TlsFingerprint, in_error_chain};
use crate::stall::ConnStreams;
use crate::tasks::{Watchdog, tracked};
use crate::tls::server_name;

/// A running daemon.
pub struct Running {
    /// Where the proxy listens (port resolved).
    pub proxy_addr: SocketAddr,
    /// Where the admin API listens (port resolved).
    pub admin_addr: SocketAddr,
    /// Where the metrics-only listener listens, when `admin.metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// Shared state (for tests and the admin API).
    pub app: Arc<App>,
    stop: watch::Sender<bool>,
    proxy: tokio::task::JoinHandle<()>,
    admin: tokio::task::JoinHandle<()>,
    metrics: Option<tokio::task::JoinHandle<()>>,
    /// The SYN defense's task: on stop it puts back the namespace's own
    /// syncookies setting, which only it knows.
    syn: Option<tokio::task::JoinHandle<()>>,
}

/// How long a stop waits for the SYN defense's last poll and its restore.
const SYN_STOP: Duration = Duration::from_secs(5);

impl Running {
    /// Stops accepting, drains in-flight requests (bounded by
    /// `server.shutdown_grace`), then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.proxy.await;
        let _ = self.admin.await;
        if let Some(metrics) = self.metrics {
            let _ = metrics.await;
        }
        // Waited for, or the process could end while the task was in a
        // poll, before it restored syncookies (seen under load in CI).
        if let Some(task) = self.syn {
            let _ = tokio::time::timeout(SYN_STOP, task).await;
        }
        // Our firewall rules and XDP program go before the process does,
        // even if the SYN defense's task did not get there in time.
        if let Some(defense) = self.app.syn().cloned() {
            let _ = tokio::task::spawn_blocking(move || defense.shutdown()).await;
        }
    }

    /// Drains without dropping a request: `/readyz` answers 503 at once so
    /// load balancers and Kubernetes endpoints take us out of rotation; in
    /// the meantime the proxy goes on accepting and serving for
    /// `server.drain_delay` (requests still routed to us by a balancer that
    /// has not noticed yet are answered, not refused). Then
    /// [`shutdown`](Self::shutdown). `skip` completing ends the delay early
    /// (a second SIGTERM or Ctrl-C).
    pub async fn drain(self, skip: impl Future<Output = ()>) {
        self.app.ready.store(false, Ordering::Release);
        let delay = self.app.runtime().config.server.drain_delay;
        if !delay.is_zero() {
            tracing::info!("not ready; still serving for {delay:?} (server.drain_delay)");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = skip => tracing::info!("drain delay cut short"),
            }
        }
        self.shutdown().await;
    }
}

/// Binds the proxy and admin listeners and starts serving a fixed config.
pub async fn start(config: Config) -> std::io::Result<Running> {
    start_reloadable(config, None).await
}

/// Like [`start`]; with a `source`, the config file is watched and can be
/// reloaded (file change, `POST /api/v1/reload`, or [`App::reload`]).
pub async fn start_reloadable(config: Config, source: Option<ConfigSource>) -> std::io::Result<Running> {
    let proxy_listener = bind_with_backlog(config.server.listen, config.server.backlog, "proxy")?;
    let admin_listener = bind(config.admin.listen, "admin").await?;
    let metrics_listener = match config.admin.metrics_listen {
        Some(addr) => Some(bind(addr, "admin.metrics_listen").await?),
        None => None,
    };
    let watched = source.as_ref().map(|s| s.path.clone());
    let app = Arc::new(App::new(config, source));
    app.open_state().map_err(std::io::Error::other)?;
    app.open_access_log()?;
    let (stop, stopped) = watch::channel(false);
    crate::tasks::spawn(crate::feed::run(app.clone(), stopped.clone()));
    if let Some(cluster) = app.cluster.clone() {
        crate::tasks::spawn(crate::cluster::run(cluster, app.clone(), stopped.clone()));
    }
    if let Some(path) = watched {
        crate::tasks::spawn(crate::reload::watch(app.clone(), path, stopped.clone()));
    }
    if let Some(cfg) = app.runtime().config.watchdog.clone() {
        crate::tasks::spawn(watchdog(app.clone(), cfg, stopped.clone()));
    }
    let syn = app
        .start_syn_defense(proxy_listener.local_addr()?)
        .map(|defense| crate::tasks::spawn(defense.run(stopped.clone())));
    crate::tasks::spawn(refresh_never_ban(app.clone(), stopped.clone()));
    crate::tasks::spawn(crate::trim::run(stopped.clone()));
    let metrics_addr = metrics_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let metrics =
        metrics_listener.map(|l| crate::tasks::spawn(admin::serve_metrics(l, app.clone(), stopped.clone())));
    let running = Running {
        proxy_addr: proxy_listener.local_addr()?,
        admin_addr: admin_listener.local_addr()?,
        metrics_addr,
        metrics,
        syn,
        proxy: crate::tasks::spawn(serve_proxy(proxy_listener, app.clone(), stopped.clone())),
        admin: crate::tasks::spawn(admin::serve(admin_listener, app.clone(), stopped)),
        app,
        stop,
    };
    Ok(running)
}

/// The client listener, with an accept queue of `backlog`: tokio's `bind`
/// asks for 128, which a SYN burst fills before the accept loop wakes.
fn bind_with_backlog(addr: SocketAddr, backlog: u32, what: &str) -> std::io::Result<TcpListener> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // As tokio's bind does: a restart must not wait out TIME_WAIT.
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
        TcpListener::from_std(socket.into())
    };
    listen().map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}")))
}

async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}")))
}

/// Rebuilds the never-ban set every `syn.reconcile_interval` (10 s), until
/// `stop`: an upstream, Redis or feed host named in the config may move to
/// another address (a cloud load balancer's do), and a spoofed flood "from"
/// its new one must not get it banned until the next reload.
async fn refresh_never_ban(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    loop {
        let every = app
            .runtime()
            .config
            .syn
            .as_ref()
            .map_or(Duration::from_secs(10), |s| s.reconcile_interval);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let config = app.runtime().config.clone();
        app.rebuild_never_ban(config).await;
    }
}

/// Samples the live task count and alerts on leaks, until `stop`.
async fn watchdog(app: Arc<App>, cfg: WatchdogSettings, mut stop: watch::Receiver<bool>) {
    let mut dog = Watchdog::new(cfg.rules);
    let mut shown: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cfg.interval) => {}
            _ = stop.changed() => return,
        }
        let total = tokio::runtime::Handle::current().metrics().num_alive_tasks() as u64;
        let sites = crate::tasks::live_by_site();
        let m = &app.metrics;
        m.tasks_alive.set(i64::try_from(total).unwrap_or(i64::MAX));
        // The ten busiest sites; sites that dropped out of the top go to 0.
        let top: Vec<String> = sites.iter().take(10).map(|(s, _)| s.clone()).collect();
        for gone in shown.iter().filter(|s| !top.contains(s)) {
            m.task_sites
                .get_or_create(&crate::metrics::SiteLabel { site: gone.clone() })
                .set(0);
        }
        for (site, live) in sites.iter().take(10) {
            m.task_sites
                .get_or_create(&crate::metrics::SiteLabel { site: site.clone() })
                .set(*live);
        }
        shown = top;
        for alert in dog.observe(app.now(), total, &sites) {
            m.task_growth_alerts
                .get_or_create(&crate::metrics::SiteLabel {
                    site: alert.site.clone(),
                })
                .inc();
            tracing::warn!(
                site = %alert.site,
                live = alert.live,
                grew_by = alert.grew_by,
                tasks_now = alert.total.0,
                tasks_a_minute_ago = alert.total.1,
                "task count growing: possible leak"
            );
        }
    }
}

/// Accepts until told to stop, then drains.
async fn serve_proxy(listener: TcpListener, app: Arc<App>, mut stop: watch::Receiver<bool>) {
    // Each connection holds a receiver until it ends: `true` asks it to
    // finish its requests and close; the count is what is left to drain.
    let (drain, draining) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    let pending_headers = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    let _ = stream.set_nodelay(true);
                    let rt = app.runtime();
                    if rt.config.server.proxy_protocol {
                        // Only a trusted load balancer may speak for others.
                        if !rt.shield.config().trusted_proxies.contains(peer.ip()) {
                            refuse(&app, stream, peer, "untrusted_proxy");
                        } else if let Some(pending) = PendingHeader::take(&pending_headers) {
                            tasks.spawn(tracked(proxied(app.clone(), stream, peer, pending, draining.clone())));
                        } else {
                            // Headers from trusted peers are read in parallel; past the cap a
                            // stalled balancer cannot hold more sockets and tasks.
                            refuse(&app, stream, peer, "proxy_header_pending");
                        }
                    } else {
                        match admit(&app, peer.ip()) {
                            Ok(permit) => {
                                tasks.spawn(tracked(connection(app.clone(), stream, peer, permit, draining.clone())));
                            }
                            Err(reason) => refuse(&app, stream, peer, reason),
                        }
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
    drop(listener);
    app.ready.store(false, Ordering::Release);
    drop(draining);
    let _ = drain.send(true);
    let open = drain.receiver_count();
    if open > 0 {
        tracing::info!(connections = open, "draining");
    }
    let grace = app.runtime().config.server.shutdown_grace;
    if tokio::time::timeout(grace, drain.closed()).await.is_err() {
        tracing::warn!(
            remaining = tasks.len(),
            "shutdown grace of {grace:?} over; closing remaining connections"
        );
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Admission: deny list, then the connection bounds, for the client at
/// `ip` (the TCP peer, or the address a PROXY header vouched for).
fn admit(app: &App, ip: IpAddr) -> Result<Permit, &'static str> {
    let rt = app.runtime();
    let ip = ip.to_canonical();
    let cfg = rt.shield.config();
    let allowed = cfg.allow.iter().any(|n| n.contains(&ip));
    if cfg.deny.iter().any(|n| n.contains(&ip)) && !allowed {
        return Err(Refusal::Denylisted.as_str());
    }
    if app.syn_banned(ip) && !allowed {
        return Err("syn_flood");
    }
    let per_address = !cfg.trusted_proxies.contains(ip) && !allowed;
    app.admission
        .admit(ip, per_address, app.now())
        .map_err(Refusal::as_str)
}

/// Resets a refused connection (SO_LINGER 0): no FIN handshake, no
/// TIME_WAIT, nothing read. Counted; logged on a budget.
fn refuse(app: &App, stream: TcpStream, peer: SocketAddr, reason: &'static str) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
    Metrics::inc(&app.metrics.connections_refused, reason);
    if app.refusal_log_budget.take(app.now()) {
        tracing::info!(%peer, reason, "connection refused");
    }
}

/// PROXY headers read at once, as in the library's listener.
pub const MAX_PENDING_PROXY_HEADERS: usize = 1024;

/// One PROXY header being read; the count drops when it is done.
struct PendingHeader(Arc<AtomicUsize>);

impl PendingHeader {
    fn take(count: &Arc<AtomicUsize>) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_PENDING_PROXY_HEADERS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for PendingHeader {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads the PROXY protocol header (within the header deadline) and admits
/// the client it names; a missing or bad header resets the connection.
async fn proxied(
    app: Arc<App>,
    mut stream: TcpStream,
    peer: SocketAddr,
    pending: PendingHeader,
    drain: Drain,
) {
    let deadline = app.runtime().config.server.header_read_timeout;
    let header = tokio::time::timeout(deadline, palisade::read_proxy_header(&mut stream)).await;
    drop(pending);
    let client = match header {
        Ok(Ok(ProxyHeader::Proxied { source, .. })) => source,
        Ok(Ok(ProxyHeader::Local)) => peer,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "bad PROXY header");
            return refuse(&app, stream, peer, "proxy_header");
        }
        Err(_) => return refuse(&app, stream, peer, "proxy_header_timeout"),
    };
    match admit(&app, client.ip()) {
        Ok(permit) => connection(app, stream, client, permit, drain).await,
        Err(reason) => refuse(&app, stream, client, reason),
    }
}

/// One client connection: TLS handshake (bounded), then HTTP until done.
/// The permit is held until the connection ends.
async fn connection(app: Arc<App>, stream: TcpStream, peer: SocketAddr, permit: Permit, drain: Drain) {
    let permit = Arc::new(permit);
    let m: &Metrics = &app.metrics;
    m.connections.inc();
    m.connections_open.inc();
    // New connections follow the config in force when they arrive.
    let rt = app.runtime();
    if let Some(page) = &rt.config.server.maintenance_page {
        maintenance(&app, &rt, page, stream, peer).await;
        m.connections_open.dec();
        return;
    }
    match &rt.config.tls {
        None => serve_http(&app, &rt, stream, client(peer, None, &permit), drain).await,
        Some(tls) => {
            if let Some((stream, fingerprint)) = handshake(&app, &rt, tls, stream, peer).await {
                let sni = stream
                    .get_ref()
                    .1
                    .server_name()
                    .map(|n| Arc::from(server_name(n)));
                let mut conn = client(peer, Some(fingerprint), &permit);
                conn.sni = sni;
                serve_http(&app, &rt, stream, conn, drain).await;
            }
        }
    }
    m.connections_open.dec();
}

/// The TLS handshake, bounded by `tls.handshake_timeout`, and the JA4
/// of the client's ClientHello (`None` when it had none to compute).
/// Failures are counted; a timeout also counts against the client's
/// adaptive breaker.
async fn handshake(
    app: &App,
    rt: &Runtime,
    tls: &crate::tls::TlsConfig,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(TlsStream<Recorded<TcpStream>>, Option<TlsFingerprint>)> {
    let mut accept = tls.acceptor.accept(Recorded::new(stream));
    match tokio::time::timeout(tls.handshake_timeout, &mut accept).await {
        Ok(Ok(mut stream)) => {
            let fingerprint = stream.get_mut().0.fingerprint();
            Some((stream, fingerprint))
        }
        Ok(Err(e)) => {
            Metrics::inc(&app.metrics.tls_handshake_errors, "failed");
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            Metrics::inc(&app.metrics.conn_timeouts, "tls_handshake");
            // A whole ClientHello then silence: the stack that sent it is known.
            let fingerprint = accept.get_mut().and_then(|r| r.fingerprint());
            if let Some(t) = rt.shield.observe_connection_failure(
                peer.ip(),
                Signal::TlsHandshakeTimeout,
                fingerprint.as_ref().map(|f| f.stable.as_str()),
            ) {
                app.adaptive_transition(t);
            }
            None
        }
    }
}

/// Maintenance mode: the static page, then close.
async fn maintenance(app: &App, rt: &Runtime, page: &MaintenancePage, stream: TcpStream, peer: SocketAddr) {
    let (head, write) = (
        rt.config.server.header_read_timeout,
        rt.config.server.write_timeout,
    );
    let served = match &rt.config.tls {
        None => page.serve_tcp(stream, head, write).await,
        Some(tls) => match handshake(app, rt, tls, stream, peer).await {
            Some((tls_stream, _)) => page.serve_copy(tls_stream, head, write).await,
            None => return,
        },
    };
    match served {
        Ok(how) => Metrics::inc(&app.metrics.maintenance_responses, how),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            Metrics::inc(&app.metrics.conn_timeouts, Expired::Write.as_str());
            tracing::debug!(%peer, "maintenance page: client stopped reading");
        }
        Err(e) => tracing::debug!(%peer, error = %e, "maintenance page not delivered"),
    }
}

/// `tls` is `None` on plain HTTP, else the connection's fingerprint.
fn client(peer: SocketAddr, tls: Option<Option<TlsFingerprint>>, permit: &Arc<Permit>) -> ClientConn {
    ClientConn {
        peer,
        tls: tls.is_some(),
        permit: Some(permit.clone()),
        tls_fingerprint: tls.flatten(),
        sni: None,
    }
}

/// Asks a connection to drain when it turns `true` (or its sender goes).
type Drain = watch::Receiver<bool>;

async fn serve_http<I>(app: &Arc<App>, rt: &Runtime, io: I, conn: ClientConn, mut drain: Drain)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let s = &rt.config.server;
    let deadlines = Deadlines {
        header: s.header_read_timeout,
        idle: s.idle_timeout,
        write: s.write_timeout,
        response_rate: response_rate(s),
    };
    let activity = Arc::new(ConnActivity::default());
    let io = TokioIo::new(TimedIo::new(io, activity.clone(), deadlines));
    let peer = conn.peer;
    let fingerprint = conn.tls_fingerprint;
    let service = ProxyService::new(app.clone(), conn, activity.clone());
    let conn = rt
        .builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    let streams = ConnStreams::new(
        s.write_timeout,
        response_rate(s),
        app.metrics.stalled_responses.clone(),
        app.metrics
            .conn_timeouts
            .get_or_create(&KindLabel {
                kind: Expired::SlowRead.as_str(),
            })
            .clone(),
    );
    let mut stalled = false;
    let served = streams.scope(async {
        let mut conn = std::pin::pin!(conn);
        let mut closing = false;
        loop {
            tokio::select! {
                ended = conn.as_mut() => break ended,
                _ = drain.changed(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = streams.all_stalled(), if !closing => {
                    // Every stream held its window shut: GOAWAY, then close
                    // once the (reset) streams are gone.
                    closing = true;
                    stalled = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    });
    if let Err(e) = served.await {
        if is_parse_error(e.as_ref())
            && let Some(t) = rt.shield.observe_connection_failure(
                peer.ip(),
                Signal::HeaderParseFailure,
                fingerprint.as_ref().map(|f| f.stable.as_str()),
            )
        {
            app.adaptive_transition(t);
        }
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
    if stalled {
        Metrics::inc(&app.metrics.conn_timeouts, "stalled");
    } else if let Some(what) = activity.expired() {
        Metrics::inc(&app.metrics.conn_timeouts, what.as_str());
    }
}

/// `server.response_min_rate`, counted over windows of `write_timeout`.
pub(crate) fn response_rate(s: &crate::config::ServerConfig) -> MinRate {
    MinRate {
        min_rate: s.response_min_rate,
        grace: s.write_timeout,
    }
}

/// Whether a connection failed because its request head could not be parsed
/// (hyper answers those with 400/431 itself).
fn is_parse_error(e: &(dyn std::error::Error + 'static)) -> bool {
    in_error_chain(e, |err| {
        err.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
    })
}
