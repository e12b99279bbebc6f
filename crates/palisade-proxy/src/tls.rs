//! TLS termination with rustls: ALPN `h2` and `http/1.1`, a certificate
//! per server name (SNI) beside a default one, all read at start and on
//! every reload (and when the files change), so renewals apply without a
//! restart.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ResolvesServerCertUsingSni};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// `[tls]`, with the certificate already loaded.
#[derive(Clone)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// PEM private key.
    pub key: std::path::PathBuf,
    /// `[[tls.certificates]]`: the certificate and key files of each.
    pub named: Vec<(PathBuf, PathBuf)>,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
    /// Ready to accept with the loaded certificate.
    pub acceptor: TlsAcceptor,
    /// Which certificate each name gets, as the acceptor picks it.
    pub certificates: Arc<Certificates>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("named", &self.named)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl PartialEq for TlsConfig {
    /// Same files and timeout; the files' contents may have changed.
    fn eq(&self, other: &Self) -> bool {
        self.cert == other.cert
            && self.key == other.key
            && self.named == other.named
            && self.handshake_timeout == other.handshake_timeout
    }
}

impl TlsConfig {
    /// Every certificate and key file, for the reload watcher.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        [self.cert.as_path(), self.key.as_path()]
            .into_iter()
            .chain(self.named.iter().flat_map(|(c, k)| [c.as_path(), k.as_path()]))
    }
}

/// The certificate for a ClientHello: the one configured for its exact
/// server name, else for its `*.parent`, else the default (no SNI, an IP
/// address, an unknown name).
#[derive(Debug)]
pub struct Certificates {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the parent domain: `*.example.com` → `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl Certificates {
    /// The certificate served to a client asking for `name` (lower case,
    /// without a trailing dot).
    fn for_name(&self, name: &str) -> &Arc<CertifiedKey> {
        let found = self.exact.get(name).or_else(|| {
            // A wildcard covers one label: a.example.com, not a.b.example.com.
            name.split_once('.')
                .and_then(|(_, parent)| self.wildcard.get(parent))
        });
        found.unwrap_or(&self.default)
    }

    /// Whether a connection opened for `sni` may carry requests for `host`
    /// (both lower case, without a trailing dot or port): it may when it
    /// is the connection Palisade would have made for `host`, with the same
    /// certificate. Browsers reuse a connection for every name its
    /// certificate covers (HTTP/2 connection coalescing); a name that has a
    /// certificate of its own must come on a connection of its own.
    pub fn serves_alike(&self, sni: &str, host: &str) -> bool {
        sni == host || Arc::ptr_eq(self.for_name(sni), self.for_name(host))
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        // rustls hands the name over as sent; DNS names compare without case.
        let name = server_name(name);
        Some(self.for_name(&name).clone())
    }
}

/// A server name in its compared form: lower case, no trailing dot.
pub fn server_name(sent: &str) -> String {
    sent.trim_end_matches('.').to_ascii_lowercase()
}

/// A certificate for some names: `names` as configured.
pub struct Named {
    /// Server names, exact or `*.parent` (one label).
    pub names: Vec<String>,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Which named certificate an error is about (`None`: the default).
pub struct TlsError {
    /// Index in `[[tls.certificates]]`.
    pub named: Option<usize>,
    /// What is wrong, naming the file.
    pub message: String,
}

/// Reads the default certificate and every named one and builds an
/// acceptor that picks by SNI. Errors say which entry and file, and what
/// is wrong (a key that does not belong to its certificate, a name the
/// certificate does not cover).
pub fn acceptor_by_name(
    cert: &Path,
    key: &Path,
    named: &[Named],
) -> Result<(TlsAcceptor, Arc<Certificates>), TlsError> {
    let default = certified(cert, key).map_err(|message| TlsError { named: None, message })?;
    let mut resolver = Certificates {
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        default: Arc::new(default),
    };
    for (i, n) in named.iter().enumerate() {
        let err = |message| TlsError {
            named: Some(i),
            message,
        };
        let ck = Arc::new(certified(&n.cert, &n.key).map_err(err)?);
        if n.names.is_empty() {
            return Err(err(
                "names is empty: list the server names this certificate is for".into(),
            ));
        }
        for name in &n.names {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let (table, probe) = match name.strip_prefix("*.") {
                // A wildcard is checked against the certificate with one label in its place.
                Some(parent) => (&mut resolver.wildcard, format!("palisade-check.{parent}")),
                None => (&mut resolver.exact, name.clone()),
            };
            ResolvesServerCertUsingSni::new()
                .add(&probe, (*ck).clone())
                .map_err(|e| err(format!("{}: not usable for {name:?}: {e}", n.cert.display())))?;
            let key = name.strip_prefix("*.").unwrap_or(&name).to_string();
            if table.insert(key, ck.clone()).is_some() {
                return Err(err(format!("{name:?} is listed for two certificates")));
            }
        }
    }
    let resolver = Arc::new(resolver);
    let acceptor = build(resolver.clone()).map_err(|message| TlsError { named: None, message })?;
    Ok((acceptor, resolver))
}

/// A PEM certificate chain and its key, checked to belong together.
fn certified(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in the file", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("{} does not belong to {}: {e}", key.display(), cert.display()))?;
    Ok(certified)
}

fn build(resolver: Arc<dyn ResolvesServerCert>) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
