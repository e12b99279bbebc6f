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

/// An HTTPS upstream on 127.0.0.1 answering `200 tls-upstream`, with the
/// number of TLS handshakes it completed. `client_ca`: client certificates
/// are required and must be issued by it.
async fn tls_upstream(
    cert: &(String, String),
    client_ca: Option<&Ca>,
) -> (std::net::SocketAddr, Arc<AtomicU64>) {
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
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"tls-upstream"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, handshakes)
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
