//! Listeners, connection tasks and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use palisade_limits::adaptive::Signal;
use palisade_limits::admission::{Permit, Refusal};

use crate::admin;
use crate::config::Config;
use crate::io::{ConnActivity, Deadlines, TimedIo};
use crate::metrics::Metrics;
use crate::proxy::{App, ClientConn, ConfigSource, ProxyService, Runtime};

/// A running daemon.
pub struct Running {
    /// Where the proxy listens (port resolved).
    pub proxy_addr: SocketAddr,
    /// Where the admin API listens (port resolved).
    pub admin_addr: SocketAddr,
    /// Shared state (for tests and the admin API).
    pub app: Arc<App>,
    stop: watch::Sender<bool>,
    proxy: tokio::task::JoinHandle<()>,
    admin: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, drains in-flight requests (bounded by
    /// `server.shutdown_grace`), then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.proxy.await;
        let _ = self.admin.await;
    }

    /// Runs until `signal` completes, then shuts down.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
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
    let proxy_listener = bind(config.server.listen, "proxy").await?;
    let admin_listener = bind(config.admin.listen, "admin").await?;
    let watched = source.as_ref().map(|s| s.path.clone());
    let app = Arc::new(App::new(config, source));
    let (stop, stopped) = watch::channel(false);
    if let Some(path) = watched {
        tokio::spawn(crate::reload::watch(app.clone(), path, stopped.clone()));
    }
    let running = Running {
        proxy_addr: proxy_listener.local_addr()?,
        admin_addr: admin_listener.local_addr()?,
        proxy: tokio::spawn(serve_proxy(proxy_listener, app.clone(), stopped.clone())),
        admin: tokio::spawn(admin::serve(admin_listener, app.clone(), stopped)),
        app,
        stop,
    };
    Ok(running)
}

async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}")))
}

/// Accepts until told to stop, then drains.
async fn serve_proxy(listener: TcpListener, app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    if let Some(permit) = admit(&app, &stream, peer) {
                        let _ = stream.set_nodelay(true);
                        tasks.spawn(connection(app.clone(), stream, peer, permit, graceful.watcher()));
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
    let open = graceful.count();
    if open > 0 {
        tracing::info!(connections = open, "draining");
    }
    let grace = app.runtime().config.server.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            remaining = tasks.len(),
            "shutdown grace of {grace:?} over; closing remaining connections"
        );
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Admission at accept: deny list, then the connection bounds. A refused
/// connection is reset (SO_LINGER 0): no FIN handshake, no TIME_WAIT, and
/// not a byte read.
fn admit(app: &App, stream: &TcpStream, peer: SocketAddr) -> Option<Permit> {
    let rt = app.runtime();
    let ip = peer.ip().to_canonical();
    let cfg = rt.shield.config();
    let refusal = if cfg.deny.iter().any(|n| n.contains(&ip)) && !cfg.allow.iter().any(|n| n.contains(&ip)) {
        Refusal::Denylisted
    } else {
        let per_address = !cfg.trusted_proxies.contains(ip) && !cfg.allow.iter().any(|n| n.contains(&ip));
        match app.admission.admit(ip, per_address, app.now()) {
            Ok(permit) => return Some(permit),
            Err(r) => r,
        }
    };
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
    Metrics::inc(&app.metrics.connections_refused, refusal.as_str());
    if app.refusal_log_budget.take(app.now()) {
        tracing::info!(%peer, reason = refusal.as_str(), "connection refused at accept");
    }
    None
}

/// One client connection: TLS handshake (bounded), then HTTP until done.
/// The permit is held until the connection ends.
async fn connection(app: Arc<App>, stream: TcpStream, peer: SocketAddr, _permit: Permit, watcher: Watcher) {
    let m: &Metrics = &app.metrics;
    m.connections.inc();
    m.connections_open.inc();
    // New connections follow the config in force when they arrive.
    let rt = app.runtime();
    match &rt.config.tls {
        None => serve_http(&app, &rt, stream, peer, false, watcher).await,
        Some(tls) => match tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream)).await {
            Ok(Ok(stream)) => serve_http(&app, &rt, stream, peer, true, watcher).await,
            Ok(Err(e)) => {
                Metrics::inc(&m.tls_handshake_errors, "failed");
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                Metrics::inc(&m.conn_timeouts, "tls_handshake");
                if let Some(t) = rt
                    .shield
                    .observe_connection_failure(peer.ip(), Signal::TlsHandshakeTimeout)
                {
                    app.adaptive_transition(t);
                }
            }
        },
    }
    m.connections_open.dec();
}

async fn serve_http<I>(app: &Arc<App>, rt: &Runtime, io: I, peer: SocketAddr, tls: bool, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let s = &rt.config.server;
    let deadlines = Deadlines {
        header: s.header_read_timeout,
        idle: s.idle_timeout,
        write: s.write_timeout,
    };
    let activity = Arc::new(ConnActivity::default());
    let io = TokioIo::new(TimedIo::new(io, activity.clone(), deadlines));
    let service = ProxyService {
        app: app.clone(),
        conn: ClientConn { peer, tls },
        activity: activity.clone(),
    };
    let conn = rt.builder.serve_connection(io, service).into_owned();
    if let Err(e) = watcher.watch(conn).await {
        if is_parse_error(e.as_ref())
            && let Some(t) = rt
                .shield
                .observe_connection_failure(peer.ip(), Signal::HeaderParseFailure)
        {
            app.adaptive_transition(t);
        }
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
    if let Some(what) = activity.expired() {
        Metrics::inc(&app.metrics.conn_timeouts, what.as_str());
    }
}

/// Whether a connection failed because its request head could not be parsed
/// (hyper answers those with 400/431 itself).
fn is_parse_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && h.is_parse()
        {
            return true;
        }
        cur = err.source();
    }
    false
}
