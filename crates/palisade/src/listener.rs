use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use palisade_core::{Clock, MonotonicClock};
use palisade_limits::admission::{Admission, AdmissionConfig, Permit};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

/// A TCP listener that admits connections before handing them out.
pub struct AdmissionListener {
    inner: TcpListener,
    admission: Arc<Admission>,
    clock: MonotonicClock,
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
        }
    }

    /// The guard (open connection count, address table).
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// The next admitted connection. Refused ones are reset (SO_LINGER 0)
    /// and skipped; accept errors (EMFILE...) back off instead of spinning.
    pub async fn accept_admitted(&self) -> (Admitted, SocketAddr) {
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => match self.admission.admit(peer.ip(), true, self.clock.now()) {
                    Ok(permit) => return (Admitted { stream, permit }, peer),
                    Err(refusal) => {
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        tracing::debug!(%peer, reason = refusal.as_str(), "connection refused");
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
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
