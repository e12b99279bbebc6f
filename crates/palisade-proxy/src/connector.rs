//! Upstream connections, capped per upstream.
//!
//! The pool bounds only idle connections; busy ones grow with the requests
//! in flight, so clients that hold responses could open as many upstream
//! connections as they have streams. [`CappedConnector`] counts the open
//! connections of each upstream authority (a slot rides inside the
//! connection and is given back when it closes) and refuses a new one at
//! the cap at once: the request is answered 503, it never waits.
//!
//! An `https://` upstream's connection is the same TCP connection with a
//! TLS handshake on top, under the same cap, pool and timeouts.
//!
//! An HTTP/2 upstream (`h2c://` in clear, `h2://` over TLS with ALPN `h2`)
//! carries every request to it on one multiplexed connection, so the cap
//! on connections would bound nothing: [`Caps`] then counts the streams in
//! flight to it instead, under the same `upstream.max_connections`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, Scheme};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::upstream_tls::{TlsFailed, UpstreamTls};

/// Every upstream connection is in use and the cap is reached.
#[derive(Debug, thiserror::Error)]
#[error("upstream connection limit ({0}) reached")]
pub struct AtCapacity(pub usize);

/// How an upstream is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1, a request per connection at a time (`http://`, `https://`).
    Http1,
    /// HTTP/2, every request a stream of one connection (`h2c://`, `h2://`).
    H2,
}

/// The scheme requests to an upstream URL go out with (`http` or `https`)
/// and the protocol spoken, or `None` for a scheme that is not an
/// upstream's.
pub fn wire(uri: &Uri) -> Option<(Scheme, Protocol)> {
    match uri.scheme_str()? {
        "http" => Some((Scheme::HTTP, Protocol::Http1)),
        "https" => Some((Scheme::HTTPS, Protocol::Http1)),
        "h2c" => Some((Scheme::HTTP, Protocol::H2)),
        "h2" => Some((Scheme::HTTPS, Protocol::H2)),
        _ => None,
    }
}

/// The upstream did not agree to HTTP/2 in the TLS handshake.
#[derive(Debug, thiserror::Error)]
#[error("upstream did not select h2 in ALPN")]
pub struct NoH2;

/// An `https://` upstream, but no TLS settings to reach it with.
#[derive(Debug, thiserror::Error)]
#[error("no TLS settings for an https upstream")]
struct NoTls;

/// TLS for `https://` authorities, and the longest handshake.
#[derive(Clone)]
struct Tls {
    settings: UpstreamTls,
    handshake_timeout: Duration,
}

/// At most `max` of something (connections, streams) per authority.
#[derive(Clone)]
pub struct Caps {
    max: usize,
    open: Arc<Mutex<HashMap<Authority, Arc<AtomicUsize>>>>,
}

impl Caps {
    /// `max` per authority.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// A place for `authority`, or [`AtCapacity`] at once.
    pub fn slot(&self, authority: Option<&Authority>) -> Result<Slot, AtCapacity> {
        // Only configured upstreams are ever asked for, so the map stays
        // as small as the upstream list.
        let count = match authority {
            Some(a) => self
                .open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(a.clone())
                .or_default()
                .clone(),
            None => Arc::default(),
        };
        if count.fetch_add(1, Ordering::AcqRel) >= self.max {
            count.fetch_sub(1, Ordering::AcqRel);
            return Err(AtCapacity(self.max));
        }
        Ok(Slot(count))
    }
}

/// An [`HttpConnector`] with at most `max` open connections per authority,
/// speaking TLS to `https://` ones.
#[derive(Clone)]
pub struct CappedConnector {
    inner: HttpConnector,
    caps: Caps,
    tls: Option<Tls>,
    /// Offers only `h2` in ALPN, and insists on it.
    h2: bool,
}

impl CappedConnector {
    /// Wraps `inner`, allowing `max` connections to each authority.
    pub fn new(inner: HttpConnector, max: usize) -> Self {
        Self {
            inner,
            caps: Caps::new(max),
            tls: None,
            h2: false,
        }
    }

    /// The same connector, under the same cap, for HTTP/2 upstreams: TLS
    /// ones are asked for `h2` in ALPN.
    #[must_use]
    pub fn for_h2(&self) -> Self {
        Self {
            h2: true,
            ..self.clone()
        }
    }

    /// Speaks TLS with `settings` to `https://` authorities; a handshake
    /// longer than `handshake_timeout` fails the connection as a connect
    /// timeout does.
    #[must_use]
    pub fn with_tls(mut self, settings: UpstreamTls, handshake_timeout: Duration) -> Self {
        // The scheme decides TLS here, so the inner connector must accept
        // https URIs (it connects TCP only).
        self.inner.enforce_http(false);
        self.tls = Some(Tls {
            settings,
            handshake_timeout,
        });
        self
    }
}

/// One place under the cap, given back on drop.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower_service::Service<Uri> for CappedConnector {
    type Response = CappedConn;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Boxed<Result<CappedConn, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let slot = self.caps.slot(uri.authority());
        let h2 = self.h2;
        let tls = (uri.scheme() == Some(&Scheme::HTTPS)).then(|| self.tls.clone());
        // Only a TLS connection needs the host past the TCP connect.
        let host = tls.is_some().then(|| uri.host().map(str::to_owned)).flatten();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let slot = slot?;
            let tcp = connecting.await?;
            let Some(tls) = tls else {
                return Ok(CappedConn {
                    io: Io::Plain(tcp),
                    slot,
                });
            };
            let tls = tls.ok_or(NoTls)?;
            let name = match &tls.settings.server_name {
                Some(name) => name.clone(),
                None => crate::upstream_tls::server_name(host.as_deref().unwrap_or_default())?,
            };
            let connector = if h2 {
                &tls.settings.connector_h2
            } else {
                &tls.settings.connector
            };
            let handshake = connector.connect(name, tcp.into_inner());
            let stream = match tokio::time::timeout(tls.handshake_timeout, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(TlsFailed::new(&e).into()),
                Err(_) => {
                    return Err(
                        io::Error::new(io::ErrorKind::TimedOut, "upstream TLS handshake timed out").into(),
                    );
                }
            };
            // Spoken to in HTTP/2 unasked, an HTTP/1.1 server answers
            // with a protocol error: say what is wrong instead.
            if h2 && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(NoH2.into());
            }
            Ok(CappedConn {
                io: Io::Tls(Box::new(TokioIo::new(stream))),
                slot,
            })
        })
    }
}

enum Io {
    Plain(TokioIo<TcpStream>),
    // Boxed: a rustls connection is over a kilobyte, a socket a few words.
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

/// An upstream connection holding its place under the cap.
pub struct CappedConn {
    io: Io,
    slot: Slot,
}

impl CappedConn {
    /// The plain socket and its place under the cap (a tunnel splices the
    /// one and keeps the other); a TLS connection is handed back as it is.
    pub fn into_tcp(self) -> Result<(TcpStream, Slot), Self> {
        match self.io {
            Io::Plain(tcp) => Ok((tcp.into_inner(), self.slot)),
            io @ Io::Tls(_) => Err(Self { io, slot: self.slot }),
        }
    }
}

impl Connection for CappedConn {
    fn connected(&self) -> Connected {
        match &self.io {
            Io::Plain(tcp) => tcp.connected(),
            Io::Tls(tls) => {
                let (tcp, session) = tls.inner().get_ref();
                let connected = tcp.connected();
                if session.alpn_protocol() == Some(b"h2") {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

impl Read for CappedConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Io::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl Write for CappedConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Io::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Io::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io).poll_flush(cx),
            Io::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Io::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }
}
