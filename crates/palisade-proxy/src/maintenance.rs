//! Maintenance mode: every connection gets a static `503` page from a file,
//! sent with `sendfile(2)` on plain TCP (the page never enters user space),
//! then the connection is closed.
//!
//! Every write has the same progress deadline as a proxied connection
//! (`server.write_timeout`): a client that asks for the page and never reads
//! it would otherwise hold the connection, its permit and the open file for
//! as long as it likes.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `server.maintenance_page`, checked at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenancePage {
    /// The file.
    pub path: PathBuf,
    /// Its `Content-Type`, from the extension.
    pub content_type: &'static str,
}

impl MaintenancePage {
    /// Checks that `path` is a readable regular file.
    pub fn open(path: &Path) -> Result<Self, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{}: not a regular file", path.display()));
        }
        std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let content_type = match path.extension().and_then(|e| e.to_str()) {
            Some("html" | "htm") => "text/html; charset=utf-8",
            Some("json") => "application/json",
            _ => "text/plain; charset=utf-8",
        };
        Ok(Self {
            path: path.to_path_buf(),
            content_type,
        })
    }

    fn head(&self, len: u64) -> String {
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {}\r\ncontent-length: {len}\r\nretry-after: 120\r\nconnection: close\r\n\r\n",
            self.content_type
        )
    }

    /// Answers one plain-TCP connection; returns how the body was sent.
    /// A write that makes no progress for `write_deadline` fails with
    /// [`io::ErrorKind::TimedOut`].
    pub async fn serve_tcp(
        &self,
        mut stream: TcpStream,
        header_deadline: Duration,
        write_deadline: Duration,
    ) -> io::Result<&'static str> {
        read_head(&mut stream, header_deadline).await;
        let file = std::fs::File::open(&self.path)?;
        let len = file.metadata()?.len();
        write_all(&mut stream, self.head(len).as_bytes(), write_deadline).await?;
        #[cfg(target_os = "linux")]
        let how = {
            sendfile::all(&stream, &file, len, write_deadline).await?;
            "sendfile"
        };
        #[cfg(not(target_os = "linux"))]
        let how = {
            let body = std::fs::read(&self.path)?;
            write_all(&mut stream, &body, write_deadline).await?;
            "copy"
        };
        within(write_deadline, stream.shutdown()).await?;
        Ok(how)
    }

    /// Answers one connection of any kind (TLS) by copying the page, with
    /// the same write deadline as [`Self::serve_tcp`].
    pub async fn serve_copy<S>(
        &self,
        mut stream: S,
        header_deadline: Duration,
        write_deadline: Duration,
    ) -> io::Result<&'static str>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        read_head(&mut stream, header_deadline).await;
        // A maintenance page is small and in the page cache after the first
        // read: reading it inline costs less than a blocking-pool hop.
        let body = std::fs::read(&self.path)?;
        write_all(
            &mut stream,
            self.head(body.len() as u64).as_bytes(),
            write_deadline,
        )
        .await?;
        write_all(&mut stream, &body, write_deadline).await?;
        within(write_deadline, stream.flush()).await?;
        within(write_deadline, stream.shutdown()).await?;
        Ok("copy")
    }
}

/// `step`, failed with `TimedOut` if it does not finish within `deadline`.
async fn within<T>(deadline: Duration, step: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(deadline, step)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "write made no progress")))
}

/// Writes all of `buf`; each write must make progress within `deadline`
/// (a slow reader is fine, a reader that stopped is not).
async fn write_all<S: tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    mut buf: &[u8],
    deadline: Duration,
) -> io::Result<()> {
    while !buf.is_empty() {
        match within(deadline, stream.write(buf)).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => buf = &buf[n..],
        }
    }
    Ok(())
}

/// Reads (and drops) the request head, so closing does not reset a client
/// still sending it. Bounded in bytes and time; a silent client is
/// answered anyway.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, deadline: Duration) {
    let mut buf = [0u8; 8192];
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(deadline, async {
        while seen.len() < 64 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                return;
            }
        }
    })
    .await;
}

#[cfg(target_os = "linux")]
mod sendfile {
    use std::io;
    use std::os::fd::AsRawFd;

    use std::time::Duration;

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Sends the first `len` bytes of `file` to `stream` with `sendfile(2)`;
    /// the socket must take some within each `deadline`.
    pub async fn all(
        stream: &TcpStream,
        file: &std::fs::File,
        len: u64,
        deadline: Duration,
    ) -> io::Result<()> {
        let mut offset: libc::off_t = 0;
        while (offset as u64) < len {
            super::within(deadline, stream.writable()).await?;
            let left = (len - offset as u64).min(1 << 30) as usize;
            let sent = stream.try_io(Interest::WRITABLE, || {
                // SAFETY: both descriptors are open for the call; `offset`
                // is a valid, exclusively borrowed off_t.
                let n = unsafe { libc::sendfile(stream.as_raw_fd(), file.as_raw_fd(), &mut offset, left) };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match sent {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while sending",
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
