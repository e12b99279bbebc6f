//! Upgraded connections (WebSocket and other `Upgrade:` protocols) are
//! byte tunnels. On Linux, when both ends are plain TCP sockets, bytes move
//! socket → pipe → socket with `splice(2)` and never enter user space;
//! otherwise (TLS on either side) they are copied.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::io::TimedIo;

/// How a tunnel moved its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelMode {
    /// Kernel-side, with `splice(2)`.
    Splice,
    /// Through user-space buffers.
    Copy,
}

impl TunnelMode {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Splice => "splice",
            Self::Copy => "copy",
        }
    }
}

/// When either direction last moved bytes, for the idle deadline.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// Nothing moved yet; the idle clock starts now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Bytes moved just now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Runs a tunnel between an upgraded client connection and an upgraded
/// upstream connection until both directions end, or nothing has moved
/// either way for `idle`. Returns the mode used and the bytes moved (client
/// → upstream, upstream → client).
pub async fn run(
    client: Upgraded,
    upstream: Upgraded,
    idle: Duration,
) -> (TunnelMode, io::Result<(u64, u64)>) {
    let activity = Activity::new();
    let (mode, moving) = start(client, upstream, &activity);
    let result = tokio::select! {
        r = moving => r,
        () = activity.idle_for(idle) => Err(io::Error::new(io::ErrorKind::TimedOut, "tunnel idle")),
    };
    (mode, result)
}

type Moving<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<(u64, u64)>> + Send + 'a>>;

fn start<'a>(client: Upgraded, upstream: Upgraded, activity: &'a Activity) -> (TunnelMode, Moving<'a>) {
    type ClientIo = TokioIo<TimedIo<TcpStream>>;
    let client = match hyper_util::server::conn::auto::upgrade::downcast::<ClientIo>(client) {
        Ok(parts) => parts,
        Err(client) => {
            return (
                TunnelMode::Copy,
                Box::pin(copy(TokioIo::new(client), TokioIo::new(upstream), activity)),
            );
        }
    };
    let mut client_tcp = client.io.into_inner().into_inner();
    let upstream = match upstream.downcast::<crate::connector::CappedConn>() {
        Ok(parts) => parts,
        Err(upstream) => {
            let pending = client.read_buf;
            return (
                TunnelMode::Copy,
                Box::pin(async move {
                    let mut upstream = TokioIo::new(upstream);
                    upstream.write_all(&pending).await?;
                    copy(client_tcp, upstream, activity).await
                }),
            );
        }
    };
    let (to_upstream, to_client) = (client.read_buf, upstream.read_buf);
    // The upstream connection keeps its place under the cap while tunnelling.
    let (mut upstream_tcp, slot) = match upstream.io.into_tcp() {
        Ok(plain) => plain,
        Err(tls) => {
            return (
                TunnelMode::Copy,
                Box::pin(async move {
                    let mut upstream = TokioIo::new(tls);
                    upstream.write_all(&to_upstream).await?;
                    client_tcp.write_all(&to_client).await?;
                    let moved = copy(client_tcp, upstream, activity).await?;
                    Ok((
                        moved.0 + to_upstream.len() as u64,
                        moved.1 + to_client.len() as u64,
                    ))
                }),
            );
        }
    };
    #[cfg(target_os = "linux")]
    let mode = TunnelMode::Splice;
    #[cfg(not(target_os = "linux"))]
    let mode = TunnelMode::Copy;
    let moving = async move {
        let _slot = slot;
        // Bytes hyper had already read past the HTTP heads go first.
        upstream_tcp.write_all(&to_upstream).await?;
        client_tcp.write_all(&to_client).await?;
        let extra = (to_upstream.len() as u64, to_client.len() as u64);
        #[cfg(target_os = "linux")]
        let moved = splice::bidirectional(&client_tcp, &upstream_tcp, activity).await?;
        #[cfg(not(target_os = "linux"))]
        let moved = copy(client_tcp, upstream_tcp, activity).await?;
        Ok((moved.0 + extra.0, moved.1 + extra.1))
    };
    (mode, Box::pin(moving))
}

async fn copy<A, B>(a: A, b: B, activity: &Activity) -> io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut a = Touching { inner: a, activity };
    tokio::io::copy_bidirectional(&mut a, &mut { b }).await
}

/// Marks activity whenever bytes are read from the wrapped side (in a
/// bidirectional copy, everything written to one side was read from the
/// other, so watching one side's reads and writes sees all traffic).
struct Touching<'a, T> {
    inner: T,
    activity: &'a Activity,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Touching<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Touching<'_, T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `splice(2)` pumps between two TCP sockets through a pipe per direction.
#[cfg(target_os = "linux")]
pub mod splice {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Bytes moved per `splice` call (the pipe's default capacity).
    const CHUNK: usize = 64 * 1024;

    /// Moves bytes both ways until both directions reach end of stream; a
    /// direction that ends shuts the other socket's write side, so
    /// half-closes pass through.
    pub async fn bidirectional(
        a: &TcpStream,
        b: &TcpStream,
        activity: &super::Activity,
    ) -> io::Result<(u64, u64)> {
        tokio::try_join!(pump(a, b, activity), pump(b, a, activity))
    }

    fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors we own.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain descriptors and null offsets (sockets and pipes have
        // no offsets); the kernel validates everything else.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// One direction: `src` → pipe → `dst`, until `src` ends.
    async fn pump(src: &TcpStream, dst: &TcpStream, activity: &super::Activity) -> io::Result<u64> {
        let (pipe_r, pipe_w) = pipe()?;
        let mut total = 0u64;
        loop {
            let n = loop {
                src.readable().await?;
                match src.try_io(Interest::READABLE, || {
                    splice(src.as_raw_fd(), pipe_w.as_raw_fd(), CHUNK)
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
                return Ok(total);
            }
            let mut left = n;
            while left > 0 {
                dst.writable().await?;
                match dst.try_io(Interest::WRITABLE, || {
                    splice(pipe_r.as_raw_fd(), dst.as_raw_fd(), left)
                }) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            total += n as u64;
            activity.touch();
        }
    }
}
