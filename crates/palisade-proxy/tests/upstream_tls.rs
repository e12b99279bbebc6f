//! `https://` upstreams over real sockets: a tokio-rustls upstream with
//! rcgen certificates behind the daemon, trusted through `upstream.tls_ca`,
//! checked by name, asking for a client certificate, and reused across
//! requests; certificate errors answered 502 and counted by reason.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use common::{Harness, metric};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use palisade_proxy::config::{Config, Overrides};
use palisade_proxy::proxy::ConfigSource;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A CA, able to issue certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    /// A CA named `name`: two CAs of the same name would look like one
    /// whose signature does not verify, not like an unknown issuer.
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `names`, as (chain PEM, key PEM).
    fn issue(&self, names: &[&str], expired: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("palisade-upstls-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// An HTTPS upstream on 127.0.0.1 and the number of TLS handshakes it
/// completed; see [`tls_upstream_full`].
async fn tls_upstream(
    cert: &(String, String),
    client_ca: Option<&Ca>,
) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let u = tls_upstream_full(cert, client_ca).await;
    (u.addr, u.handshakes)
}

struct TlsUpstream {
    addr: std::net::SocketAddr,
    /// TLS handshakes completed.
    handshakes: Arc<AtomicU64>,
    /// Requests for `/hold` received.
    held: Arc<AtomicU64>,
    /// Lets every `/hold` request answer.
    release: Arc<tokio::sync::Notify>,
}

/// An HTTPS upstream on 127.0.0.1: `/ws` accepts an `Upgrade` with 101 and
/// echoes bytes, `/hold` answers once released, anything else is
/// `200 tls-upstream`. `client_ca`: client certificates are required and
/// must be issued by it.
async fn tls_upstream_full(cert: &(String, String), client_ca: Option<&Ca>) -> TlsUpstream {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.0.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.issuer.der().clone()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicU64::new(0));
    let counted = handshakes.clone();
    let held = Arc::new(AtomicU64::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let (held_seen, released) = (held.clone(), release.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            let (held, release) = (held_seen.clone(), released.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let service = service_fn(move |req| answer(req, held.clone(), release.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    TlsUpstream {
        addr,
        handshakes,
        held,
        release,
    }
}

async fn answer(
    mut req: Request<hyper::body::Incoming>,
    held: Arc<AtomicU64>,
    release: Arc<tokio::sync::Notify>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match req.uri().path() {
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
            resp.headers_mut()
                .insert(http::header::UPGRADE, http::HeaderValue::from_static("echo"));
            Ok(resp)
        }
        "/hold" => {
            let released = release.notified();
            held.fetch_add(1, Ordering::SeqCst);
            released.await;
            Ok(Response::new(Full::new(Bytes::from_static(b"released"))))
        }
        _ => Ok(Response::new(Full::new(Bytes::from_static(b"tls-upstream")))),
    }
}

async fn proxy(upstream: std::net::SocketAddr, upstream_keys: &str) -> Harness {
    Harness::start_with_upstream(
        &format!("https://{upstream}"),
        "",
        &format!("[upstream]\n{upstream_keys}\n"),
        upstream,
    )
    .await
}

#[tokio::test]
async fn an_https_upstream_is_reached_with_its_ca_and_its_connection_reused() {
    let d = dir("ok");
    let ca = Ca::new("upstream CA");
    let (addr, handshakes) = tls_upstream(&ca.issue(&["127.0.0.1"], false), None).await;
    let ca_file = write(&d, "ca.pem", &ca.pem());
    let h = proxy(addr, &format!("tls_ca = \"{ca_file}\"")).await;
    let mut client = h.client("127.0.0.2").await;
    for _ in 0..5 {
        let (status, _, body) = client.get("/").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "tls-upstream"));
    }
    // Five requests, one TLS connection to the upstream: pooled and reused.
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
    h.running.shutdown().await;
}

#[tokio::test]
async fn tls_server_name_overrides_the_url_host() {
    let d = dir("sni");
    let ca = Ca::new("upstream CA");
    let (addr, _) = tls_upstream(&ca.issue(&["app.internal.test"], false), None).await;
    let ca_file = write(&d, "ca.pem", &ca.pem());
    let h = proxy(
        addr,
        &format!("tls_ca = \"{ca_file}\"\ntls_server_name = \"app.internal.test\""),
    )
    .await;
    let (status, _, body) = h.client("127.0.0.2").await.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "tls-upstream"));
    h.running.shutdown().await;
}

/// One request through a proxy to `addr` with `[upstream]` `keys` is
/// answered 502 and counted once as an upstream error of `kind`.
async fn refused(addr: std::net::SocketAddr, keys: &str, kind: &str) {
    let h = proxy(addr, keys).await;
    let (status, _, _) = h.client("127.0.0.2").await.get("/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{keys}");
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, &format!("palisade_upstream_errors_total{{kind=\"{kind}\"}}")),
        1.0,
        "{keys}"
    );
    h.running.shutdown().await;
}

#[tokio::test]
async fn certificate_errors_are_502s_counted_by_reason() {
    let d = dir("bad");
    let ca = Ca::new("upstream CA");
    let ca_file = write(&d, "ca.pem", &ca.pem());
    let other_ca = write(&d, "other-ca.pem", &Ca::new("another CA").pem());
    let (addr, _) = tls_upstream(&ca.issue(&["127.0.0.1"], false), None).await;
    // Without our CA (another one trusted instead), the issuer is unknown.
    refused(addr, &format!("tls_ca = \"{other_ca}\""), "tls_unknown_issuer").await;
    // Trusted, but not the name asked for.
    refused(
        addr,
        &format!("tls_ca = \"{ca_file}\"\ntls_server_name = \"elsewhere.test\""),
        "tls_name_mismatch",
    )
    .await;
    let (expired, _) = tls_upstream(&ca.issue(&["127.0.0.1"], true), None).await;
    refused(expired, &format!("tls_ca = \"{ca_file}\""), "tls_expired").await;
}

#[tokio::test]
async fn an_upstream_requiring_a_client_certificate_gets_ours() {
    let d = dir("mtls");
    let ca = Ca::new("upstream CA");
    let ca_file = write(&d, "ca.pem", &ca.pem());
    let clients = Ca::new("client CA");
    let (addr, _) = tls_upstream(&ca.issue(&["127.0.0.1"], false), Some(&clients)).await;

    refused(addr, &format!("tls_ca = \"{ca_file}\""), "tls_refused").await;

    let (cert, key) = clients.issue(&["palisade.test"], false);
    let cert = write(&d, "client.pem", &cert);
    let key = write(&d, "client-key.pem", &key);
    let h = proxy(
        addr,
        &format!("tls_ca = \"{ca_file}\"\ntls_client_cert = \"{cert}\"\ntls_client_key = \"{key}\""),
    )
    .await;
    let (status, _, body) = h.client("127.0.0.2").await.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "tls-upstream"));
    h.running.shutdown().await;
}

#[tokio::test]
async fn bad_tls_files_are_config_errors_with_their_key_at_load_and_on_reload() {
    let d = dir("config");
    let ca = Ca::new("upstream CA");
    let (addr, _) = tls_upstream(&ca.issue(&["127.0.0.1"], false), None).await;
    let ca_file = write(&d, "ca.pem", &ca.pem());
    let (cert, _) = ca.issue(&["palisade.test"], false);
    let (_, other_key) = ca.issue(&["palisade.test"], false);
    let cert = write(&d, "client.pem", &cert);
    let other_key = write(&d, "other-key.pem", &other_key);
    let not_pem = write(&d, "not.pem", "hello\n");
    let load = |keys: &str| {
        let text = common::config_text(&format!("https://{addr}"), "", &format!("[upstream]\n{keys}\n"));
        let path = d.join("palisade.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path, &Overrides::default()).map_err(|e| e.to_string())
    };
    let toml = d.join("palisade.toml").display().to_string();

    let missing = d.join("missing.pem").display().to_string();
    let e = load(&format!("tls_ca = \"{missing}\"")).unwrap_err();
    assert!(e.starts_with(&format!("{toml}:")), "{e}");
    assert!(
        e.contains(": upstream.tls_ca: ") && e.contains("missing.pem"),
        "{e}"
    );
    let e = load(&format!("tls_ca = \"{not_pem}\"")).unwrap_err();
    assert!(
        e.contains(": upstream.tls_ca: ") && e.contains("no PEM certificate"),
        "{e}"
    );
    let e = load(&format!(
        "tls_ca = \"{ca_file}\"\ntls_client_cert = \"{cert}\"\ntls_client_key = \"{other_key}\""
    ))
    .unwrap_err();
    assert!(
        e.contains(": upstream.tls_client_key: ") && e.contains("does not belong to"),
        "{e}"
    );
    let e = load(&format!("tls_ca = \"{ca_file}\"\ntls_client_cert = \"{cert}\"")).unwrap_err();
    assert!(e.contains(": upstream.tls_client_cert: "), "{e}");

    // Started with a good CA; the file is then broken and a reload refused
    // with the same error, while the upstream is still reached.
    let mut config = load(&format!("tls_ca = \"{ca_file}\"")).unwrap();
    config.syn = None;
    let source = ConfigSource {
        path: d.join("palisade.toml"),
        overrides: Overrides::default(),
        token: None,
    };
    let running = palisade_proxy::start_reloadable(config, Some(source))
        .await
        .unwrap();
    std::fs::write(&ca_file, "broken\n").unwrap();
    let e = running.app.reload().await.unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{toml}:")) && e.contains(": upstream.tls_ca: "),
        "{e}"
    );
    let (status, _, body) = common::Client::connect("127.0.0.2", running.proxy_addr)
        .await
        .get("/")
        .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "tls-upstream"));
    running.shutdown().await;
}

#[tokio::test]
async fn tls_failures_open_the_upstream_breaker() {
    let d = dir("breaker");
    let ca = Ca::new("upstream CA");
    let other_ca = write(&d, "other-ca.pem", &Ca::new("another CA").pem());
    let (addr, _) = tls_upstream(&ca.issue(&["127.0.0.1"], false), None).await;
    let h = Harness::start_with_upstream(
        &format!("https://{addr}"),
        "",
        &format!(
            "[upstream]\ntls_ca = \"{other_ca}\"\n[breaker]\nmin_requests = 3\nfailure_ratio = 0.5\nopen_for = \"1h\"\n"
        ),
        addr,
    )
    .await;
    let mut client = h.client("127.0.0.2").await;
    for _ in 0..3 {
        assert_eq!(client.get("/").await.0, StatusCode::BAD_GATEWAY);
    }
    // Three handshakes refused in the window: the breaker is open, the
    // upstream is not tried again.
    assert_eq!(client.get("/").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_upstream_errors_total{kind=\"tls_unknown_issuer\"}"),
        3.0
    );
    h.running.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_through_an_https_upstream_is_tunnelled() {
    let d = dir("ws");
    let ca = Ca::new("upstream CA");
    let up = tls_upstream_full(&ca.issue(&["127.0.0.1"], false), None).await;
    let ca_file = write(&d, "ca.pem", &ca.pem());
    let h = proxy(up.addr, &format!("tls_ca = \"{ca_file}\"")).await;
    let mut s = common::connect_from("127.0.0.2", h.proxy()).await;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    // 1 MiB each way, through TLS on the upstream side: copied, not spliced.
    let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut echoed = Vec::with_capacity(payload.len());
    tokio::time::timeout(std::time::Duration::from_secs(30), r.read_to_end(&mut echoed))
        .await
        .expect("tunnel stalled")
        .unwrap();
    writer.await.unwrap();
    assert!(
        echoed == payload,
        "{} bytes echoed of {}",
        echoed.len(),
        payload.len()
    );
    let mut tunnels = 0.0;
    for _ in 0..50 {
        tunnels = metric(&h.metrics().await, "palisade_tunnels_total{kind=\"copy\"}");
        if tunnels > 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(tunnels, 1.0);
    h.running.shutdown().await;
}

#[tokio::test]
async fn tls_connections_count_against_max_connections() {
    let d = dir("cap");
    let ca = Ca::new("upstream CA");
    let up = tls_upstream_full(&ca.issue(&["127.0.0.1"], false), None).await;
    let ca_file = write(&d, "ca.pem", &ca.pem());
    let h = proxy(up.addr, &format!("tls_ca = \"{ca_file}\"\nmax_connections = 1")).await;
    let mut first = h.client("127.0.0.2").await;
    let holding = tokio::spawn(async move { first.get("/hold").await });
    // Until the upstream has the first request, its one connection may
    // not be open yet.
    for _ in 0..200 {
        if up.held.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        up.held.load(Ordering::SeqCst),
        1,
        "the held request never arrived"
    );
    let (status, _, _) = h.client("127.0.0.3").await.get("/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    up.release.notify_waiters();
    let (status, _, body) = holding.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "released"));
    // The connection is back in the pool: the next request reuses it.
    let (status, _, body) = h.client("127.0.0.3").await.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "tls-upstream"));
    assert_eq!(up.handshakes.load(Ordering::SeqCst), 1);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_upstream_errors_total{kind=\"at_capacity\"}"),
        1.0
    );
    h.running.shutdown().await;
}

/// An HTTP/2-over-TLS upstream on 127.0.0.1 (ALPN `h2` only) answering
/// with the HTTP version it was spoken to in, and its TLS handshakes.
async fn h2_tls_upstream(cert: &(String, String)) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.0.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicU64::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let version = format!("{:?}", req.version());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(version))))
                });
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, handshakes)
}

#[tokio::test]
async fn an_h2_upstream_is_spoken_to_in_http2_over_tls_on_one_connection() {
    let d = dir("h2");
    let ca = Ca::new("upstream CA");
    let (addr, handshakes) = h2_tls_upstream(&ca.issue(&["127.0.0.1"], false)).await;
    let ca_file = write(&d, "ca.pem", &ca.pem());
    let h = Harness::start_with_upstream(
        &format!("h2://{addr}"),
        "",
        &format!("[upstream]\ntls_ca = \"{ca_file}\"\n"),
        addr,
    )
    .await;
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut c = h.client(&format!("127.0.0.{}", 2 + i)).await;
        clients.push(tokio::spawn(async move { c.get("/").await }));
    }
    for c in clients {
        let (status, _, body) = c.await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "HTTP/2.0"));
    }
    // Five clients at once, one TLS connection: multiplexed.
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
    h.running.shutdown().await;
}

#[tokio::test]
async fn an_h2_upstream_that_does_not_select_h2_is_a_502() {
    let d = dir("h2-refused");
    let ca = Ca::new("upstream CA");
    // It ignores ALPN: the handshake succeeds without a protocol agreed.
    let (addr, _) = tls_upstream(&ca.issue(&["127.0.0.1"], false), None).await;
    let ca_file = write(&d, "ca.pem", &ca.pem());
    let h = Harness::start_with_upstream(
        &format!("h2://{addr}"),
        "",
        &format!("[upstream]\ntls_ca = \"{ca_file}\"\n"),
        addr,
    )
    .await;
    let (status, _, _) = h.client("127.0.0.2").await.get("/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_upstream_errors_total{kind=\"tls_handshake\"}"),
        1.0
    );
    h.running.shutdown().await;
}
