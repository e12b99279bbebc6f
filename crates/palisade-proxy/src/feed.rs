//! The store's background work: poll the delta feed, notice a
//! replaced snapshot file, apply, swap. Heavy work runs on the blocking
//! pool; requests never wait for any of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use palisade_store::{BuildOptions, StoreCell};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{FeedSource, StoreSettings};
use crate::metrics::Metrics;
use crate::proxy::App;

/// Largest delta accepted from a feed.
const MAX_DELTA_BYTES: usize = 512 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Trust roots for an https feed: the given PEM bundle, or the system's.
pub fn roots(ca: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
                let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
                roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no certificates", ca.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no system trust roots found: set store.feed_ca".into());
            }
        }
    }
    Ok(roots)
}

/// What a poll found.
#[derive(Debug)]
pub enum Fetched {
    /// Same as last time.
    NotModified,
    /// A delta to apply, and the validator to send next time.
    Delta {
        /// The delta text.
        text: String,
        /// The response's `ETag`.
        etag: Option<String>,
    },
}

/// Identity of a file's current content, cheap to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    ino: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

/// The identity of `path` now, if it exists.
pub fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(FileId {
        ino: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// Fetches the feed once. `etag`/`seen` are what the previous successful
/// poll returned, so unchanged feeds cost one 304 or one `stat`.
pub async fn fetch(
    source: &FeedSource,
    ca: Option<&Path>,
    etag: Option<&str>,
    seen: &mut Option<FileId>,
) -> Result<Fetched, String> {
    match source {
        FeedSource::File(path) => {
            let id = file_id(path);
            if id.is_some() && id == *seen {
                return Ok(Fetched::NotModified);
            }
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            *seen = id;
            Ok(Fetched::Delta { text, etag: None })
        }
        FeedSource::Url(uri) => tokio::time::timeout(FETCH_TIMEOUT, get(uri, ca, etag))
            .await
            .map_err(|_| format!("{uri}: no complete answer within {FETCH_TIMEOUT:?}"))?,
    }
}

async fn get(uri: &http::Uri, ca: Option<&Path>, etag: Option<&str>) -> Result<Fetched, String> {
    let fail = |e: &dyn std::fmt::Display| format!("{uri}: {e}");
    let host = uri.host().ok_or_else(|| fail(&"no host"))?;
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| fail(&e))?;
    let mut req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, uri.authority().map_or(host, |a| a.as_str()))
        .header(
            http::header::USER_AGENT,
            concat!("palisade/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(tag) = etag {
        req = req.header(http::header::IF_NONE_MATCH, tag);
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| fail(&e))?;
    let resp = if https {
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| fail(&e))?
                .with_root_certificates(roots(ca)?)
                .with_no_client_auth();
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned()).map_err(|e| fail(&e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| fail(&e))?;
        send(TokioIo::new(tls), req).await
    } else {
        send(TokioIo::new(tcp), req).await
    }
    .map_err(|e| fail(&e))?;
    match resp.status() {
        http::StatusCode::NOT_MODIFIED => Ok(Fetched::NotModified),
        http::StatusCode::OK => {
            let etag = resp
                .headers()
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = Limited::new(resp.into_body(), MAX_DELTA_BYTES)
                .collect()
                .await
                .map_err(|e| fail(&format!("reading the body: {e}")))?
                .to_bytes();
            let text = String::from_utf8(body.to_vec()).map_err(|_| fail(&"the delta is not UTF-8"))?;
            Ok(Fetched::Delta { text, etag })
        }
        status => Err(fail(&format!("HTTP {status}"))),
    }
}

async fn send<T>(
    io: T,
    req: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    crate::tasks::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await
}

/// Applies a delta on the blocking pool, counting and logging the outcome.
/// `Ok(false)`: already applied.
pub async fn apply(
    cell: Arc<StoreCell>,
    metrics: &Metrics,
    text: String,
    source: String,
) -> Result<bool, String> {
    let src = source.clone();
    let result = tokio::task::spawn_blocking(move || cell.apply_delta(&text, &src, BuildOptions::default()))
        .await
        .map_err(|e| format!("delta task failed: {e}"))?;
    let kind = match &result {
        Ok(true) => "applied",
        Ok(false) => "unchanged",
        Err(_) => "rejected",
    };
    Metrics::inc(&metrics.store_updates, kind);
    match &result {
        Ok(true) => tracing::info!(%source, "reputation delta applied"),
        Ok(false) => tracing::debug!(%source, "reputation delta already applied"),
        Err(e) => tracing::error!(%source, "reputation delta rejected, the store keeps its data: {e}"),
    }
    result.map_err(|e| e.to_string())
}

/// Re-opens the snapshot file (replaced by `palisade store build`).
pub async fn reload(cell: Arc<StoreCell>, metrics: &Metrics) -> Result<(), String> {
    let path: Option<PathBuf> = cell.path().map(Path::to_path_buf);
    let result = tokio::task::spawn_blocking(move || cell.reload())
        .await
        .map_err(|e| format!("reload task failed: {e}"))?;
    match &result {
        Ok(()) => {
            Metrics::inc(&metrics.store_updates, "reloaded");
            tracing::info!(path = ?path, "reputation store reloaded");
        }
        Err(e) => {
            Metrics::inc(&metrics.store_updates, "rejected");
            tracing::error!("reputation store reload failed, keeping the loaded one: {e}");
        }
    }
    result.map_err(|e| e.to_string())
}

/// Polls until `stop`: the snapshot file for replacement, the feed for
/// deltas. Follows config reloads (settings and cell come from the runtime
/// in force at each tick).
pub async fn run(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut etag: Option<String> = None;
    let mut feed_seen: Option<FileId> = None;
    let mut snapshot_seen: Option<(PathBuf, Option<FileId>)> = None;
    // A feed that stays broken is reported once, not at every poll.
    let mut failing: Option<String> = None;
    loop {
        let rt = app.runtime();
        let interval = rt
            .config
            .store
            .as_ref()
            .map_or(Duration::from_secs(10), |s| s.poll_interval);
        let settings: Option<StoreSettings> = rt.config.store.clone();
        let cell = rt.shield.config().store.clone();
        drop(rt);
        if let (Some(settings), Some(cell)) = (settings, cell) {
            let now_id = file_id(&settings.path);
            match &snapshot_seen {
                Some((path, id)) if *path == settings.path && *id != now_id && now_id.is_some() => {
                    let _ = reload(cell.clone(), &app.metrics).await;
                }
                _ => {}
            }
            if let Some(feed) = &settings.feed {
                match fetch(feed, settings.feed_ca.as_deref(), etag.as_deref(), &mut feed_seen).await {
                    Ok(Fetched::NotModified) => failing = None,
                    Ok(Fetched::Delta { text, etag: tag }) => {
                        failing = None;
                        let name = match feed {
                            FeedSource::File(p) => p.display().to_string(),
                            FeedSource::Url(u) => u.to_string(),
                        };
                        if apply(cell.clone(), &app.metrics, text, name).await.is_ok() {
                            etag = tag;
                        }
                    }
                    Err(e) if failing.as_ref() == Some(&e) => {}
                    Err(e) => {
                        Metrics::inc(&app.metrics.store_updates, "rejected");
                        cell.reject(&e);
                        tracing::warn!("reputation feed: {e}");
                        failing = Some(e);
                    }
                }
            }
            // Our own writes (applied deltas) change the file too; seeing
            // them here keeps them from counting as a replacement.
            snapshot_seen = Some((settings.path.clone(), file_id(&settings.path)));
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}
