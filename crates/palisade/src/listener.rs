use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ipnet::IpNet;
use palisade_core::proxy_protocol::{self, ProxyHeader, ProxyHeaderError};
use palisade_core::{Clock, MonotonicClock, TrustedProxies};
use palisade_limits::admission::{Admission, AdmissionConfig, Permit, Refusal};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::task::JoinSet;

/// Connections from trusted proxies whose PROXY header is still being read.
/// Bounded: past it, new ones are reset rather than queued.
const MAX_PENDING_HEADERS: usize = 1024;

struct ProxyProtocol {
    trusted: TrustedProxies,
    timeout: Duration,
    pending: JoinSet<Option<(Admitted, SocketAddr)>>,
}

/// A TCP listener that admits connections before handing them out.
pub struct AdmissionListener {
    inner: TcpListener,
    admission: Arc<Admission>,
    clock: MonotonicClock,
    proxy: Option<ProxyProtocol>,
    lists: Arc<Lists>,
}

/// Allow and deny lists applied at accept, as the daemon does: denied
/// sources are reset, allowed ones skip the per-address bounds.
#[derive(Debug, Default)]
struct Lists {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

pin_project_lite::pin_project! {
    /// An admitted connection; its place is released when it is dropped.
    pub struct Admitted {
        #[pin]
        stream: TcpStream,
        permit: Permit,
    }
}

impl Admitted {
    /// The socket.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

impl AdmissionListener {
    /// Binds `addr` with the given bounds (IPv6 clients grouped by /64, at
    /// most 100 000 addresses tracked).
    ///
    /// ```
    /// use palisade::{AdmissionConfig, AdmissionListener};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let listener = AdmissionListener::bind("127.0.0.1:0", AdmissionConfig::default()).await.unwrap();
    /// let addr = listener.local_addr().unwrap();
    /// assert!(addr.ip().is_loopback());
    /// # });
    /// ```
    pub async fn bind(addr: impl ToSocketAddrs, cfg: AdmissionConfig) -> io::Result<Self> {
        Ok(Self::new(TcpListener::bind(addr).await?, cfg))
    }

    /// Wraps a bound listener.
    pub fn new(inner: TcpListener, cfg: AdmissionConfig) -> Self {
        Self::with_admission(inner, Arc::new(Admission::new(cfg, 64, 100_000)))
    }

    /// Wraps a bound listener with a guard shared with other listeners.
    pub fn with_admission(inner: TcpListener, admission: Arc<Admission>) -> Self {
        Self {
            inner,
            admission,
            clock: MonotonicClock::new(),
            proxy: None,
            lists: Arc::default(),
        }
    }

    /// Resets connections from `deny` before reading a byte and exempts
    /// `allow` from the per-address bounds (the daemon's `clients.deny` and
    /// `clients.allow` at accept; [`Palisade::bind`](crate::Palisade::bind)
    /// sets them from the shield's config).
    pub fn lists(mut self, allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        self.lists = Arc::new(Lists { allow, deny });
        self
    }

    /// Expects a PROXY protocol (v1 or v2) header on every connection, as
    /// the daemon's `server.proxy_protocol` does: only peers in `trusted`
    /// may send one (others are reset), the header must arrive within
    /// `timeout`, and the client it names is the one admitted and handed
    /// to the server (axum's `ConnectInfo`). Headers are read concurrently,
    /// so a slow proxy connection does not hold up the others.
    pub fn proxy_protocol(mut self, trusted: TrustedProxies, timeout: Duration) -> Self {
        self.proxy = Some(ProxyProtocol {
            trusted,
            timeout,
            pending: JoinSet::new(),
        });
        self
    }

    /// The guard (open connection count, address table).
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// The next admitted connection and its client's address. Refused
    /// ones are reset (SO_LINGER 0) and skipped; accept errors (EMFILE...)
    /// back off instead of spinning. Cancel-safe.
    pub async fn accept_admitted(&mut self) -> (Admitted, SocketAddr) {
        let mut backoff = Duration::from_millis(5);
        loop {
            let has_pending = self.has_pending();
            let pending = self.proxy.as_mut().map(|p| &mut p.pending);
            let accepted = tokio::select! {
                // Every outcome is taken here: a refused header must not
                // disable this branch while others are still pending.
                done = async { pending?.join_next().await }, if has_pending => {
                    if let Some(Ok(Some(ready))) = done {
                        return ready;
                    }
                    continue;
                }
                accepted = self.inner.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match &mut self.proxy {
                None => {
                    if let Some(admitted) =
                        admit(&self.admission, &self.lists, self.clock, stream, peer, true)
                    {
                        return (admitted, peer);
                    }
                }
                Some(p) if p.trusted.contains(peer.ip()) && p.pending.len() < MAX_PENDING_HEADERS => {
                    let (admission, clock, timeout) = (self.admission.clone(), self.clock, p.timeout);
                    let lists = self.lists.clone();
                    let trusted = p.trusted.clone();
                    p.pending.spawn(async move {
                        let mut stream = stream;
                        let client = match tokio::time::timeout(timeout, read_proxy_header(&mut stream)).await
                        {
                            Ok(Ok(ProxyHeader::Proxied { source, .. })) => source,
                            Ok(Ok(ProxyHeader::Local)) => peer,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "bad PROXY header");
                                return reset(stream, peer, "proxy_header");
                            }
                            Err(_) => return reset(stream, peer, "proxy_header_timeout"),
                        };
                        // A proxy speaking for itself counts only against the overall bounds.
                        let per_address = !trusted.contains(client.ip());
                        admit(&admission, &lists, clock, stream, client, per_address).map(|a| (a, client))
                    });
                }
                Some(_) => {
                    reset::<()>(stream, peer, "untrusted_proxy");
                }
            }
        }
    }

    fn has_pending(&self) -> bool {
        self.proxy.as_ref().is_some_and(|p| !p.pending.is_empty())
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

fn admit(
    admission: &Arc<Admission>,
    lists: &Lists,
    clock: MonotonicClock,
    stream: TcpStream,
    client: SocketAddr,
    per_address: bool,
) -> Option<Admitted> {
    let ip = client.ip().to_canonical();
    let allowed = lists.allow.iter().any(|n| n.contains(&ip));
    if !allowed && lists.deny.iter().any(|n| n.contains(&ip)) {
        return reset(stream, client, Refusal::Denylisted.as_str());
    }
    match admission.admit(ip, per_address && !allowed, clock.now()) {
        Ok(permit) => Some(Admitted { stream, permit }),
        Err(refusal) => reset(stream, client, refusal.as_str()),
    }
}

/// Resets a refused connection: no FIN handshake, no TIME_WAIT, nothing read.
fn reset<T>(stream: TcpStream, peer: SocketAddr, reason: &'static str) -> Option<T> {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    tracing::debug!(%peer, reason, "connection refused");
    None
}

/// Consumes exactly the PROXY protocol header from the stream, nothing
/// after it.
pub async fn read_proxy_header(stream: &mut TcpStream) -> io::Result<ProxyHeader> {
    let mut buf = vec![0u8; proxy_protocol::V2_MAX];
    let mut seen = 0;
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the PROXY header",
            ));
        }
        match proxy_protocol::parse(&buf[..n]) {
            Ok(Some((header, len))) => {
                stream.read_exact(&mut buf[..len]).await?;
                return Ok(header);
            }
            Ok(None) if n == buf.len() => return Err(io::Error::other(ProxyHeaderError::TooLong)),
            Ok(None) => {
                // peek() does not consume, so readiness stays set: wait a
                // little for more bytes instead of spinning.
                if n == seen {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen = n;
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

impl AsyncRead for Admitted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
}

#[cfg(feature = "axum")]
impl axum::serve::Listener for AdmissionListener {
    type Io = Admitted;
    type Addr = SocketAddr;

    fn accept(&mut self) -> impl Future<Output = (Self::Io, Self::Addr)> + Send {
        self.accept_admitted()
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// `app.into_make_service_with_connect_info::<PeerAddr>()` over an
/// [`AdmissionListener`]: the client address (the one a PROXY header
/// named, if any) reaches the layers and handlers as
/// `ConnectInfo<PeerAddr>`.
#[cfg(feature = "axum")]
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, AdmissionListener>>
    for crate::PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, AdmissionListener>) -> Self {
        Self(*stream.remote_addr())
    }
}
