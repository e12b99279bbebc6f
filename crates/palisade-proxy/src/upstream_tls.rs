//! TLS to `https://` upstreams with rustls: the trust roots (the system's
//! or a CA file), the server name sent and checked, an optional client
//! certificate, and why a handshake failed, in words an operator acts on.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, CertificateError, ClientConfig};
use tokio_rustls::TlsConnector;

/// `[upstream]`'s TLS keys, with the files already read.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Name sent as SNI and checked against the certificate, instead of
    /// the URL's host.
    pub server_name: Option<ServerName<'static>>,
    /// PEM CA bundle trusted instead of the system roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain and its key, for upstreams that ask.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The files' contents, so that a reload after a renewal builds a new
    /// connector even though the paths are the same.
    contents: Vec<Vec<u8>>,
    /// Ready to connect with, offering `http/1.1` in ALPN.
    pub connector: TlsConnector,
    /// The same, offering `h2`, for `h2://` upstreams.
    pub connector_h2: TlsConnector,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.server_name == other.server_name
            && self.ca == other.ca
            && self.client_cert == other.client_cert
            && self.contents == other.contents
    }
}

/// Which key of `[upstream]` an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// `tls_ca`, or the system roots when it is not set.
    Ca,
    /// `tls_client_cert`.
    ClientCert,
    /// `tls_client_key`.
    ClientKey,
}

fn read(path: &Path, contents: &mut Vec<Vec<u8>>) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    contents.push(bytes.clone());
    Ok(bytes)
}

/// Reads the files and builds the connector. Errors say which key, which
/// file and what is wrong with it.
pub fn load(
    server_name: Option<ServerName<'static>>,
    ca: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
) -> Result<UpstreamTls, (Key, String)> {
    let mut contents = Vec::new();
    let mut roots = rustls::RootCertStore::empty();
    match &ca {
        Some(path) => {
            let pem = read(path, &mut contents).map_err(|m| (Key::Ca, m))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| (Key::Ca, format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| (Key::Ca, format!("{}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err((
                    Key::Ca,
                    format!("{}: no PEM certificate in the file", path.display()),
                ));
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err((
                    Key::Ca,
                    "no system trust roots found for the https upstreams: set upstream.tls_ca".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| (Key::Ca, format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let mut config = match &client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let pem = read(cert, &mut contents).map_err(|m| (Key::ClientCert, m))?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| (Key::ClientCert, format!("{}: {e}", cert.display())))?;
            if chain.is_empty() {
                return Err((
                    Key::ClientCert,
                    format!("{}: no PEM certificate in the file", cert.display()),
                ));
            }
            let pem = read(key, &mut contents).map_err(|m| (Key::ClientKey, m))?;
            let der = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| (Key::ClientKey, format!("{}: {e}", key.display())))?;
            let signing = provider
                .key_provider
                .load_private_key(der)
                .map_err(|e| (Key::ClientKey, format!("{}: {e}", key.display())))?;
            let certified = CertifiedKey::new(chain, signing);
            certified.keys_match().map_err(|e| {
                (
                    Key::ClientKey,
                    format!("{} does not belong to {}: {e}", key.display(), cert.display()),
                )
            })?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)))
        }
    };
    // One protocol offered each: an upstream that cannot speak it fails
    // the handshake rather than being spoken to in the wrong one.
    let mut h2 = config.clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(UpstreamTls {
        server_name,
        ca,
        client_cert,
        contents,
        connector: TlsConnector::from(Arc::new(config)),
        connector_h2: TlsConnector::from(Arc::new(h2)),
    })
}

/// Why a TLS handshake with an upstream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsReason {
    /// Its certificate is not signed by a trusted root.
    UnknownIssuer,
    /// Its certificate does not name the server name asked for.
    NameMismatch,
    /// Its certificate has expired (or is not valid yet).
    Expired,
    /// Its certificate is unusable for another reason.
    BadCertificate,
    /// It refused us, usually for want of a (good) client certificate.
    Refused,
    /// Anything else: no common protocol, not TLS at all, reset.
    Handshake,
}

impl TlsReason {
    /// Label for metrics, after `tls_`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownIssuer => "tls_unknown_issuer",
            Self::NameMismatch => "tls_name_mismatch",
            Self::Expired => "tls_expired",
            Self::BadCertificate => "tls_bad_certificate",
            Self::Refused => "tls_refused",
            Self::Handshake => "tls_handshake",
        }
    }

    fn of(tls: &rustls::Error) -> Self {
        match tls {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => Self::UnknownIssuer,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    Self::NameMismatch
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Self::Expired,
                _ => Self::BadCertificate,
            },
            rustls::Error::AlertReceived(
                AlertDescription::CertificateRequired
                | AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied
                | AlertDescription::HandshakeFailure,
            ) => Self::Refused,
            _ => Self::Handshake,
        }
    }
}

/// A TLS handshake with an upstream failed.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed: {detail}")]
pub struct TlsFailed {
    /// Why, for the metric label and the 502's log line.
    pub reason: TlsReason,
    /// What rustls said.
    pub detail: String,
}

impl TlsFailed {
    /// Classifies a failed handshake.
    pub fn new(e: &io::Error) -> Self {
        Self {
            reason: rustls_error(e).map_or(TlsReason::Handshake, TlsReason::of),
            detail: e.to_string(),
        }
    }
}

/// The rustls error an I/O error carries, if any.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
}

/// Why TLS with an upstream failed, if that is what `e` says: a failed
/// handshake, or (TLS 1.3) the upstream's refusal of our client
/// certificate, which arrives only once the first request is on its way.
pub fn failure_in_chain(e: &(dyn std::error::Error + 'static)) -> Option<(TlsReason, String)> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(f) = err.downcast_ref::<TlsFailed>() {
            return Some((f.reason, f.detail.clone()));
        }
        // An io::Error's `source()` skips the error it wraps: look inside.
        if let Some(tls) = err.downcast_ref::<io::Error>().and_then(rustls_error) {
            return Some((TlsReason::of(tls), tls.to_string()));
        }
        cur = err.source();
    }
    None
}

/// The name an upstream URL's host is checked against: the host itself,
/// a name or an IP address (without the brackets of an IPv6 literal).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?} is not a TLS server name: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_host_is_a_name_or_an_address() {
        assert!(matches!(
            server_name("app.example").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(matches!(
            server_name("10.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        // The URL spells an IPv6 host in brackets; the certificate does not.
        assert!(matches!(server_name("[::1]").unwrap(), ServerName::IpAddress(_)));
        assert!(server_name("bad name").is_err());
    }
}
