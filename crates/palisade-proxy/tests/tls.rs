//! TLS termination over real TLS clients: ALPN h2 and http/1.1, handshake
//! timeout, certificate reload.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{config_text, demo, metric};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_proxy::config::{Config, Overrides};
use palisade_proxy::proxy::ConfigSource;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;

struct Cert {
    der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

fn make_cert() -> Cert {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    Cert {
        der: c.cert.der().clone(),
        cert_pem: c.cert.pem(),
        key_pem: c.signing_key.serialize_pem(),
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("palisade-tls-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_cert(dir: &Path, cert: &Cert) {
    std::fs::write(dir.join("cert.pem"), &cert.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &cert.key_pem).unwrap();
}

async fn start(dir: &Path, extra: &str) -> palisade_proxy::Running {
    let (upstream, _, serve) = demo().await;
    tokio::spawn(serve);
    let text = config_text(
        &format!("http://{upstream}"),
        "",
        &format!("[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n{extra}"),
    );
    let path = dir.join("palisade.toml");
    std::fs::write(&path, text).unwrap();
    let mut config = Config::load(&path, &Overrides::default()).unwrap();
    // As root the SYN defense would change the host's firewall.
    config.syn = None;
    let source = ConfigSource {
        path,
        overrides: Overrides::default(),
        token: None,
    };
    palisade_proxy::start_reloadable(config, Some(source))
        .await
        .unwrap()
}

/// A TLS connection trusting only `trusted`, offering `alpn`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    trusted: &CertificateDer<'static>,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = common::connect_from("127.0.0.50", addr).await;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn https_with_alpn_h2_and_http11() {
    let d = dir("alpn");
    let cert = make_cert();
    write_cert(&d, &cert);
    let running = start(&d, "").await;
    let addr = running.proxy_addr;

    let tls = tls_connect(addr, &cert.der, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = h2
        .send_request(
            Request::get(format!("https://localhost:{}/headers", addr.port()))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        (resp.status(), resp.version()),
        (StatusCode::OK, http::Version::HTTP_2)
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains(";proto=https"), "{body}");

    let tls = tls_connect(addr, &cert.der, b"http/1.1").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = h1
        .send_request(
            Request::get("/")
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        (resp.status(), resp.version()),
        (StatusCode::OK, http::Version::HTTP_11)
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_and_counted() {
    let d = dir("stall");
    write_cert(&d, &make_cert());
    let running = start(&d, "handshake_timeout = \"300ms\"\n").await;
    let mut tcp = common::connect_from("127.0.0.51", running.proxy_addr).await;
    // Say nothing: the server gives up after the handshake timeout.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("stalled handshake never cut")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let m = common::Client::connect("127.0.0.1", running.admin_addr)
        .await
        .get("/metrics")
        .await
        .2;
    assert_eq!(
        metric(&m, "palisade_connection_timeouts_total{kind=\"tls_handshake\"}"),
        1.0
    );
    running.shutdown().await;
}

#[tokio::test]
async fn certificates_reload_without_restart_and_bad_ones_are_refused() {
    let d = dir("reload");
    let first = make_cert();
    write_cert(&d, &first);
    let running = start(&d, "").await;
    let addr = running.proxy_addr;
    let served = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    assert_eq!(
        served(&tls_connect(addr, &first.der, b"http/1.1").await),
        first.der
    );

    let second = make_cert();
    write_cert(&d, &second);
    running.app.reload().await.unwrap();
    assert_eq!(
        served(&tls_connect(addr, &second.der, b"http/1.1").await),
        second.der
    );

    // A key that does not match: the reload is refused, the second
    // certificate keeps serving.
    std::fs::write(d.join("key.pem"), make_cert().key_pem).unwrap();
    let err = running.app.reload().await.unwrap_err().to_string();
    assert!(
        err.contains("tls.cert: ") && err.contains("does not belong to"),
        "{err}"
    );
    assert_eq!(
        served(&tls_connect(addr, &second.der, b"http/1.1").await),
        second.der
    );
    running.shutdown().await;
}

/// A self-signed certificate for `names`, written as `{stem}.pem` and `{stem}.key`.
fn named_cert(dir: &Path, stem: &str, names: &[&str]) -> Cert {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = Cert {
        der: c.cert.der().clone(),
        cert_pem: c.cert.pem(),
        key_pem: c.signing_key.serialize_pem(),
    };
    std::fs::write(dir.join(format!("{stem}.pem")), &cert.cert_pem).unwrap();
    std::fs::write(dir.join(format!("{stem}.key")), &cert.key_pem).unwrap();
    cert
}

/// The certificate the listener serves for `sni`. The client trusts only
/// `expected`, so the handshake succeeds only if that one is served.
async fn served_for(addr: std::net::SocketAddr, sni: &str, expected: &Cert) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(expected.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = common::connect_from("127.0.0.50", addr).await;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("{sni}: {e}"));
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test]
async fn a_certificate_per_server_name_with_a_default() {
    let d = dir("sni");
    // The default covers the names no entry is for, so a client trusting
    // it alone can tell it was served.
    let default = make_cert_for(&d, &["localhost", "unknown.test", "x.y.b.test"]);
    let a = named_cert(&d, "a", &["a.test"]);
    let b = named_cert(&d, "b", &["*.b.test"]);
    let running = start(
        &d,
        "[[tls.certificates]]\nnames = [\"a.test\"]\ncert = \"a.pem\"\nkey = \"a.key\"\n\
         [[tls.certificates]]\nnames = [\"*.b.test\"]\ncert = \"b.pem\"\nkey = \"b.key\"\n",
    )
    .await;
    let addr = running.proxy_addr;
    assert_eq!(served_for(addr, "a.test", &a).await, a.der);
    assert_eq!(
        served_for(addr, "A.Test", &a).await,
        a.der,
        "names compare without case"
    );
    assert_eq!(served_for(addr, "x.b.test", &b).await, b.der);
    // A wildcard covers one label only.
    assert_eq!(served_for(addr, "x.y.b.test", &default).await, default.der);
    assert_eq!(served_for(addr, "unknown.test", &default).await, default.der);
    assert_eq!(served_for(addr, "localhost", &default).await, default.der);

    // One named certificate renewed on disk: picked up by a reload.
    let a2 = named_cert(&d, "a", &["a.test"]);
    running.app.reload().await.unwrap();
    assert_eq!(served_for(addr, "a.test", &a2).await, a2.der);

    // A key that is not the certificate's: refused, naming the entry; the
    // certificates loaded before keep serving.
    std::fs::write(d.join("b.key"), make_cert().key_pem).unwrap();
    let err = running.app.reload().await.unwrap_err().to_string();
    assert!(
        err.contains("tls.certificates[1].cert: ") && err.contains("does not belong to"),
        "{err}"
    );
    assert_eq!(served_for(addr, "x.b.test", &b).await, b.der);
    running.shutdown().await;
}

#[test]
fn a_name_its_certificate_does_not_cover_is_a_config_error() {
    let d = dir("sni-cover");
    make_cert_for(&d, &["localhost"]);
    named_cert(&d, "a", &["a.test"]);
    let path = d.join("palisade.toml");
    std::fs::write(
        &path,
        "[server]\nupstreams = [\"http://127.0.0.1:1\"]\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
         [[tls.certificates]]\nnames = [\"other.test\"]\ncert = \"a.pem\"\nkey = \"a.key\"\n",
    )
    .unwrap();
    let err = Config::load(&path, &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("palisade.toml:")
            && err.contains("tls.certificates[0].cert: ")
            && err.contains("\"other.test\""),
        "{err}"
    );
}

/// The default certificate (`cert.pem`, `key.pem`) for `names`.
fn make_cert_for(dir: &Path, names: &[&str]) -> Cert {
    let cert = named_cert(dir, "cert", names);
    std::fs::rename(dir.join("cert.key"), dir.join("key.pem")).unwrap();
    cert
}

/// A TLS connection asking for `sni` (none when `None`, verifying `name`),
/// trusting `trusted`, offering `alpn`.
async fn tls_to(
    addr: std::net::SocketAddr,
    sni: Option<&str>,
    name: &str,
    trusted: &[&Cert],
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add(c.der.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.enable_sni = sni.is_some();
    let tcp = common::connect_from("127.0.0.51", addr).await;
    let server = ServerName::try_from(sni.unwrap_or(name).to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(server, tcp)
        .await
        .unwrap()
}

/// `GET /` with `Host: host` over HTTP/1.1 on `tls`.
async fn h1_status(tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>, host: &str) -> StatusCode {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    sender.send_request(req).await.unwrap().status()
}

/// Virtual hosts with a certificate each: a connection opened for
/// `a.test` may not carry a request for `b.test` (421, and b's pool never
/// sees it), over HTTP/1.1 and HTTP/2 alike; `a.test` on it goes to a's
/// pool. Names under one wildcard certificate share connections, as
/// browsers coalesce them; without a server name nothing is refused.
#[tokio::test]
async fn a_host_with_another_certificate_than_the_connection_is_misdirected() {
    let d = dir("vhost");
    let default = make_cert_for(&d, &["localhost", "a.test"]);
    let a = named_cert(&d, "a", &["a.test"]);
    let b = named_cert(&d, "b", &["b.test"]);
    let c = named_cert(&d, "c", &["*.c.test"]);
    let (a_up, a_hits, serve) = demo().await;
    tokio::spawn(serve);
    let (b_up, b_hits, serve) = demo().await;
    tokio::spawn(serve);
    let running = start(
        &d,
        &format!(
            "[[tls.certificates]]\nnames = [\"a.test\"]\ncert = \"a.pem\"\nkey = \"a.key\"\n\
             [[tls.certificates]]\nnames = [\"b.test\"]\ncert = \"b.pem\"\nkey = \"b.key\"\n\
             [[tls.certificates]]\nnames = [\"*.c.test\"]\ncert = \"c.pem\"\nkey = \"c.key\"\n\
             [[upstreams]]\nname = \"a\"\nmembers = [{{ url = \"http://{a_up}\" }}]\n\
             [[upstreams]]\nname = \"b\"\nmembers = [{{ url = \"http://{b_up}\" }}]\n\
             [[routes]]\nname = \"a\"\nhost = \"a.test\"\nupstream = \"a\"\n\
             [[routes]]\nname = \"b\"\nhost = \"b.test\"\nupstream = \"b\"\n"
        ),
    )
    .await;
    let addr = running.proxy_addr;
    let hits = || [&a_hits, &b_hits].map(|h| h.load(std::sync::atomic::Ordering::Relaxed));
    let trust_a = [&a];
    let on_a = || tls_to(addr, Some("a.test"), "a.test", &trust_a, b"http/1.1");

    assert_eq!(
        h1_status(on_a().await, "b.test").await,
        StatusCode::MISDIRECTED_REQUEST
    );
    // Case, a trailing dot and a port do not make it another host.
    assert_eq!(
        h1_status(on_a().await, "B.Test.:443").await,
        StatusCode::MISDIRECTED_REQUEST
    );
    assert_eq!(hits(), [0, 0], "b's pool never saw it");
    assert_eq!(h1_status(on_a().await, "A.test.").await, StatusCode::OK);
    assert_eq!(h1_status(on_a().await, "a.test:443").await, StatusCode::OK);
    assert_eq!(hits(), [2, 0], "a.test on a's connection goes to a's pool");
    // A name no certificate lists gets the default one: not a's either.
    assert_eq!(
        h1_status(on_a().await, "other.test").await,
        StatusCode::MISDIRECTED_REQUEST
    );

    // HTTP/2: :authority is what the connection is asked for.
    let tls = tls_to(addr, Some("a.test"), "a.test", &[&a], b"h2").await;
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    for (uri, expect) in [
        ("https://b.test/", StatusCode::MISDIRECTED_REQUEST),
        ("https://a.test/", StatusCode::OK),
    ] {
        let req = Request::get(uri).body(Full::new(Bytes::new())).unwrap();
        assert_eq!(h2.send_request(req).await.unwrap().status(), expect, "{uri}");
    }
    assert_eq!(hits(), [3, 0]);

    // One wildcard certificate: its names share a connection.
    let on_c = tls_to(addr, Some("x.c.test"), "x.c.test", &[&c], b"http/1.1").await;
    assert_eq!(h1_status(on_c, "y.c.test").await, StatusCode::OK);
    // No server name (an IP address, an old client): the default
    // certificate, and nothing to contradict.
    let bare = tls_to(addr, None, "a.test", &[&default], b"http/1.1").await;
    assert_eq!(h1_status(bare, "a.test").await, StatusCode::OK);
    assert_eq!(hits(), [4, 0]);
    let on_b = tls_to(addr, Some("b.test"), "b.test", &[&b], b"http/1.1").await;
    assert_eq!(h1_status(on_b, "b.test").await, StatusCode::OK);
    assert_eq!(hits(), [4, 1], "b.test on its own connection goes to b's pool");
    let mut admin = common::Client::connect("127.0.0.1", running.admin_addr).await;
    let m = admin.get("/metrics").await.2;
    assert_eq!(
        metric(
            &m,
            "palisade_requests_total{endpoint=\"default\",method=\"GET\",status=\"421\"}"
        ),
        4.0
    );
    running.shutdown().await;
}
