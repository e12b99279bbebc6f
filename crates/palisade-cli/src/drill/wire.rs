//! A small HTTP/1.1 client over raw bytes: attacks send what a polite
//! client would refuse to (path spellings, forged headers, a header a
//! second), from an address of their choosing.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `to` from `from` (any port). The port is picked at
/// connect time, per destination, so thousands of connections from one
/// address do not run out of ports at bind.
pub async fn connect(from: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(SocketAddr::from((from, 0)))?;
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Whether an error means the peer refused or reset us (as opposed to
/// our own timeout or a local failure).
pub fn is_refusal(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// One HTTP/1.1 connection that sends request heads and reads responses
/// one at a time.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The server said it closes (or did).
    pub closed: bool,
}

/// A response: its status and whether the server closes after it.
#[derive(Debug, Clone, Copy)]
pub struct Response {
    /// The status code.
    pub status: u16,
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(4096),
            closed: false,
        }
    }

    /// Sends `request` (a whole head, and body if any) and reads the response.
    pub async fn exchange(&mut self, request: &[u8]) -> io::Result<Response> {
        self.stream.write_all(request).await?;
        self.read_response().await
    }

    /// Reads one response; its body is read and dropped.
    pub async fn read_response(&mut self) -> io::Result<Response> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > 64 << 10 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response head too long",
                ));
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end);
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no status line"))?;
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_ascii_lowercase())
            })
        };
        if header("connection").is_some_and(|v| v.contains("close")) {
            self.closed = true;
        }
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            self.skip_chunked().await?;
        } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            self.skip(len).await?;
        } else if status >= 200 && status != 204 && status != 304 {
            // Delimited by the close.
            while self.fill().await.is_ok() {
                self.buf.clear();
            }
            self.closed = true;
        }
        Ok(Response { status })
    }

    async fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16 << 10];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            self.closed = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed by the server",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn skip(&mut self, mut len: usize) -> io::Result<()> {
        loop {
            let take = len.min(self.buf.len());
            self.buf.drain(..take);
            len -= take;
            if len == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    async fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    async fn skip_chunked(&mut self) -> io::Result<()> {
        loop {
            let line = self.line().await?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line().await?.is_empty() {}
                return Ok(());
            }
            self.skip(size + 2).await?;
        }
    }
}

/// `GET path` head with a Host of the target.
pub fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: drill.test\r\nUser-Agent: palisade-drill\r\n{extra}\r\n")
        .into_bytes()
}
