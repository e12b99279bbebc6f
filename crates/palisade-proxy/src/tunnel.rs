//! Upgraded connections (WebSocket and other `Upgrade:` protocols) are
//! byte tunnels. On Linux, when both ends are plain TCP sockets, bytes move
//! socket → pipe → socket with `splice(2)` and never enter user space;
//! otherwise (TLS on the client side) they are copied.

use std::io;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

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

/// Runs a tunnel between an upgraded client connection and an upgraded
/// upstream connection until both directions end. Returns the mode used and
/// the bytes moved (client → upstream, upstream → client).
pub async fn run(client: Upgraded, upstream: Upgraded) -> (TunnelMode, io::Result<(u64, u64)>) {
    type ClientIo = TokioIo<TimedIo<TcpStream>>;
    let client = match hyper_util::server::conn::auto::upgrade::downcast::<ClientIo>(client) {
        Ok(parts) => parts,
        Err(client) => {
            return (
                TunnelMode::Copy,
                copy(TokioIo::new(client), TokioIo::new(upstream)).await,
            );
        }
    };
    let upstream = match upstream.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => parts,
        Err(upstream) => {
            let mut tcp = client.io.into_inner().into_inner();
            let sent = tcp.write_all(&client.read_buf);
            let result = match sent.await {
                Ok(()) => copy(tcp, TokioIo::new(upstream)).await,
                Err(e) => Err(e),
            };
            return (TunnelMode::Copy, result);
        }
    };
    let mut client_tcp = client.io.into_inner().into_inner();
    let mut upstream_tcp = upstream.io.into_inner();
    // Bytes hyper had already read past the HTTP heads go first.
    let pending = async {
        upstream_tcp.write_all(&client.read_buf).await?;
        client_tcp.write_all(&upstream.read_buf).await
    };
    if let Err(e) = pending.await {
        return (TunnelMode::Copy, Err(e));
    }
    #[cfg(target_os = "linux")]
    {
        let extra = (client.read_buf.len() as u64, upstream.read_buf.len() as u64);
        let r = splice::bidirectional(&client_tcp, &upstream_tcp).await;
        (TunnelMode::Splice, r.map(|(a, b)| (a + extra.0, b + extra.1)))
    }
    #[cfg(not(target_os = "linux"))]
    {
        (TunnelMode::Copy, copy(client_tcp, upstream_tcp).await)
    }
}

async fn copy<A, B>(mut a: A, mut b: B) -> io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(&mut a, &mut b).await
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
    pub async fn bidirectional(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
        tokio::try_join!(pump(a, b), pump(b, a))
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
    async fn pump(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
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
        }
    }
}
