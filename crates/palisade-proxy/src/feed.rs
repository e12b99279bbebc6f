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

use palisade_store::sign::{MAX_SIGNATURE_BYTES, PublicKey, signature_path};

use crate::config::{FeedSource, StoreSettings};
use crate::metrics::Metrics;
use crate::proxy::App;

const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a feed update was not applied. `reason` is the label of
/// `palisade_feed_rejected_total`; `message` never holds a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedError {
    /// `fetch`, `too_large`, `unsigned`, `bad_signature`, `malformed`,
    /// `out_of_order` or `write`.
    pub reason: &'static str,
    /// What happened, naming the feed.
    pub message: String,
}

/// Every `reason` a [`FeedError`] can have.
pub const REJECT_REASONS: [&str; 7] = [
    "fetch",
    "too_large",
    "unsigned",
    "bad_signature",
    "malformed",
    "out_of_order",
    "write",
];

impl FeedError {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FeedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<palisade_store::Error> for FeedError {
    fn from(e: palisade_store::Error) -> Self {
        use palisade_store::Error as E;
        let reason = match &e {
            E::Parse { .. } | E::TooMany { .. } => "malformed",
            E::OutOfOrder { .. } | E::Rollback { .. } => "out_of_order",
            E::Untrusted { missing: true, .. } => "unsigned",
            E::Untrusted { missing: false, .. } => "bad_signature",
            E::Io { .. } | E::Corrupt { .. } => "write",
        };
        Self::new(reason, e.to_string())
    }
}

/// The `Authorization` value for a feed: the content of the environment
/// variable `name`. Errors name the variable, never its value.
pub fn auth_header(name: &str) -> Result<http::HeaderValue, String> {
    let value = std::env::var(name).map_err(|_| format!("${name} is not set (or not UTF-8)"))?;
    if value.is_empty() {
        return Err(format!("${name} is empty"));
    }
    let mut header = http::HeaderValue::from_str(&value)
        .map_err(|_| format!("the value of ${name} is not a valid header value"))?;
    header.set_sensitive(true);
    Ok(header)
}

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
    std::fs::metadata(path).ok().map(|m| FileId::of(&m))
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            ino: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
        }
    }
}

/// The feed's name in logs, errors and the admin API.
pub fn source_name(source: &FeedSource) -> String {
    match source {
        FeedSource::File(p) => p.display().to_string(),
        FeedSource::Url(u) => shown(u),
    }
}

/// A feed URL as logs and answers show it: without its query string, where
/// a publisher may have put a token.
pub fn shown(uri: &http::Uri) -> String {
    let base = format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("https"),
        uri.authority().map_or("", |a| a.as_str()),
        uri.path()
    );
    match uri.query() {
        Some(_) => format!("{base}?…"),
        None => base,
    }
}

/// Fetches the feed once, and with a public key configured checks the
/// detached signature (`.sig` next to the delta) before anything is parsed.
/// `etag`/`seen` are what the previous successful poll returned, so
/// unchanged feeds cost one 304 or one `stat`.
pub async fn fetch(
    settings: &StoreSettings,
    source: &FeedSource,
    etag: Option<&str>,
    seen: &mut Option<FileId>,
) -> Result<Fetched, FeedError> {
    let name = source_name(source);
    let (body, etag) = match source {
        FeedSource::File(path) => {
            let id = file_id(path);
            if id.is_some() && id == *seen {
                return Ok(Fetched::NotModified);
            }
            let body = read_file(path, settings.feed_max_bytes, "store.feed_max_bytes")
                .await?
                .ok_or_else(|| FeedError::new("fetch", format!("{name}: no such file")))?;
            if let Some(key) = &settings.feed_public_key {
                let sig_path = signature_path(path);
                let sig = match read_file(&sig_path, MAX_SIGNATURE_BYTES, "a signature's size").await {
                    Ok(Some(sig)) => sig,
                    Ok(None) => {
                        return Err(FeedError::new(
                            "unsigned",
                            format!("{name}: no signature ({} is missing)", sig_path.display()),
                        ));
                    }
                    Err(e) if e.reason == "too_large" => {
                        return Err(FeedError::new("bad_signature", e.message));
                    }
                    Err(e) => return Err(e),
                };
                check(key, &body, &sig, &name)?;
            }
            // Only a verified body counts as seen: a signature that arrives
            // after its delta is picked up at the next poll.
            *seen = id;
            (body, None)
        }
        FeedSource::Url(uri) => {
            match tokio::time::timeout(FETCH_TIMEOUT, get_signed(settings, uri, etag)).await {
                Err(_) => {
                    return Err(FeedError::new(
                        "fetch",
                        format!("{name}: no complete answer within {FETCH_TIMEOUT:?}"),
                    ));
                }
                Ok(got) => match got? {
                    None => return Ok(Fetched::NotModified),
                    Some(found) => found,
                },
            }
        }
    };
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| FeedError::new("malformed", format!("{name}: the delta is not UTF-8")))?;
    Ok(Fetched::Delta { text, etag })
}

fn check(key: &PublicKey, body: &[u8], sig: &[u8], name: &str) -> Result<(), FeedError> {
    key.verify(body, sig)
        .map_err(|e| FeedError::new("bad_signature", format!("{name}: {e}; rejected whole")))
}

/// Reads a whole file, at most `max` bytes of it. `None`: it does not exist.
async fn read_file(path: &Path, max: usize, bound: &str) -> Result<Option<Bytes>, FeedError> {
    use tokio::io::AsyncReadExt as _;
    let fail = |e: std::io::Error| FeedError::new("fetch", format!("{}: {e}", path.display()));
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(e)),
    };
    let mut body = Vec::new();
    // One byte more than allowed tells "exactly max" from "larger".
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    file.take(limit).read_to_end(&mut body).await.map_err(fail)?;
    if body.len() > max {
        return Err(too_large(&path.display(), max, bound));
    }
    Ok(Some(Bytes::from(body)))
}

fn too_large(name: &dyn std::fmt::Display, max: usize, bound: &str) -> FeedError {
    FeedError::new(
        "too_large",
        format!("{name}: the body is larger than {max} bytes ({bound}); not read further"),
    )
}

/// `uri` with `.sig` appended to its path (the query kept).
fn signature_uri(uri: &http::Uri) -> Result<http::Uri, FeedError> {
    let path = uri.path();
    let pq = match uri.query() {
        Some(q) => format!("{path}.sig?{q}"),
        None => format!("{path}.sig"),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|e| FeedError::new("fetch", format!("{}: {e}", shown(uri))))?,
    );
    http::Uri::from_parts(parts).map_err(|e| FeedError::new("fetch", format!("{}: {e}", shown(uri))))
}

/// The delta at `uri` and, with a public key, its verified signature.
/// `None`: unchanged since `etag`.
async fn get_signed(
    settings: &StoreSettings,
    uri: &http::Uri,
    etag: Option<&str>,
) -> Result<Option<(Bytes, Option<String>)>, FeedError> {
    let uri_shown = shown(uri);
    let auth = match &settings.feed_auth_env {
        Some(name) => {
            Some(auth_header(name).map_err(|m| FeedError::new("fetch", format!("{uri_shown}: {m}")))?)
        }
        None => None,
    };
    let ca = settings.feed_ca.as_deref();
    let (body, tag) = match get(uri, ca, etag, auth.as_ref(), settings.feed_max_bytes).await? {
        Got::NotModified => return Ok(None),
        Got::Body(body, tag) => (body, tag),
        Got::Status(status) => return Err(FeedError::new("fetch", format!("{uri_shown}: HTTP {status}"))),
    };
    if let Some(key) = &settings.feed_public_key {
        let sig_uri = signature_uri(uri)?;
        let sig_shown = shown(&sig_uri);
        let sig = match get(&sig_uri, ca, None, auth.as_ref(), MAX_SIGNATURE_BYTES).await {
            Ok(Got::Body(sig, _)) => sig,
            Ok(Got::Status(http::StatusCode::NOT_FOUND)) => {
                return Err(FeedError::new(
                    "unsigned",
                    format!("{uri_shown}: no signature ({sig_shown} answered 404)"),
                ));
            }
            Ok(Got::Status(status)) => {
                return Err(FeedError::new("fetch", format!("{sig_shown}: HTTP {status}")));
            }
            Ok(Got::NotModified) => {
                return Err(FeedError::new("fetch", format!("{sig_shown}: unexpected 304")));
            }
            Err(e) if e.reason == "too_large" => {
                return Err(FeedError::new("bad_signature", e.message));
            }
            Err(e) => return Err(e),
        };
        check(key, &body, &sig, &uri_shown)?;
    }
    Ok(Some((body, tag)))
}

/// What one GET answered.
enum Got {
    NotModified,
    Body(Bytes, Option<String>),
    Status(http::StatusCode),
}

async fn get(
    uri: &http::Uri,
    ca: Option<&Path>,
    etag: Option<&str>,
    auth: Option<&http::HeaderValue>,
    max: usize,
) -> Result<Got, FeedError> {
    let name = shown(uri);
    let fail = |e: &dyn std::fmt::Display| FeedError::new("fetch", format!("{name}: {e}"));
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
    if let Some(auth) = auth {
        req = req.header(http::header::AUTHORIZATION, auth.clone());
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| fail(&e))?;
    let resp = if https {
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| fail(&e))?
                .with_root_certificates(roots(ca).map_err(|e| fail(&e))?)
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
        http::StatusCode::NOT_MODIFIED => Ok(Got::NotModified),
        http::StatusCode::OK => {
            let etag = resp
                .headers()
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            // A declared length past the bound fails before any byte is read.
            let declared = resp
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max as u64) {
                return Err(too_large(&name, max, "store.feed_max_bytes"));
            }
            // Streamed into memory chunk by chunk, stopped at the bound.
            let body = Limited::new(resp.into_body(), max)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        too_large(&name, max, "store.feed_max_bytes")
                    } else {
                        fail(&format!("reading the body: {e}"))
                    }
                })?
                .to_bytes();
            Ok(Got::Body(body, etag))
        }
        status => Ok(Got::Status(status)),
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
) -> Result<bool, FeedError> {
    let src = source.clone();
    let result = tokio::task::spawn_blocking(move || cell.apply_delta(&text, &src, BuildOptions::default()))
        .await
        .map_err(|e| FeedError::new("write", format!("delta task failed: {e}")))?;
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
    result.map_err(FeedError::from)
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
            match e {
                palisade_store::Error::Untrusted { missing, .. } => {
                    metrics.rejected_feed(if *missing { "unsigned" } else { "bad_signature" });
                }
                palisade_store::Error::Rollback { .. } => metrics.rejected_feed("out_of_order"),
                _ => {}
            }
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
    // The snapshot file and its signature: a signature that lands after its
    // snapshot triggers the reload again.
    let mut snapshot_seen: Option<(PathBuf, [Option<FileId>; 2])> = None;
    // A feed that stays broken is reported once, not at every poll: the
    // last fetch error, and the last delta that was rejected (its digest and
    // the watermark it was tried on; it may follow a later one).
    let mut failing: Option<FeedError> = None;
    let mut rejected: Option<(ring::digest::Digest, u64)> = None;
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
            let now_id = [file_id(&settings.path), file_id(&signature_path(&settings.path))];
            // Our own write-back (an applied delta) changes the file too,
            // and is no replacement; anything else is, however soon after.
            let ours = cell.written().map(|m| FileId::of(&m));
            match &snapshot_seen {
                Some((path, id))
                    if *path == settings.path
                        && *id != now_id
                        && now_id[0].is_some()
                        && !(now_id[0] == ours && id[1] == now_id[1]) =>
                {
                    let _ = reload(cell.clone(), &app.metrics).await;
                }
                _ => {}
            }
            snapshot_seen = Some((settings.path.clone(), now_id));
            if let Some(feed) = &settings.feed {
                match fetch(&settings, feed, etag.as_deref(), &mut feed_seen).await {
                    Ok(Fetched::NotModified) => failing = None,
                    Ok(Fetched::Delta { text, etag: tag }) => {
                        failing = None;
                        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
                        let watermark = cell.load().watermark();
                        let seen_before = rejected
                            .as_ref()
                            .is_some_and(|(d, w)| d.as_ref() == digest.as_ref() && *w == watermark);
                        if !seen_before {
                            match apply(cell.clone(), &app.metrics, text, source_name(feed)).await {
                                Ok(_) => {
                                    etag = tag;
                                    rejected = None;
                                }
                                Err(e) => {
                                    app.metrics.rejected_feed(e.reason);
                                    rejected = Some((digest, watermark));
                                }
                            }
                        }
                    }
                    Err(e) if failing.as_ref() == Some(&e) => {}
                    Err(e) => {
                        Metrics::inc(&app.metrics.store_updates, "rejected");
                        app.metrics.rejected_feed(e.reason);
                        cell.reject(&e);
                        tracing::warn!(
                            reason = e.reason,
                            "reputation feed update rejected, the store keeps its data: {e}"
                        );
                        failing = Some(e);
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}
