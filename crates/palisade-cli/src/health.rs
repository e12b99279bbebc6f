//! `palisade health`: a running daemon's readiness, as an exit code, for
//! container health checks and exec probes (no curl in the image).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args)]
pub struct HealthArgs {
    /// The daemon's admin address.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Ask `/healthz` (alive, also while draining) instead of `/readyz`.
    #[arg(long)]
    live: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3)]
    timeout: u64,
}

/// 0 when the daemon answers 200; 1 (with the reason on stderr) otherwise.
pub fn run(args: &HealthArgs) -> ExitCode {
    let path = if args.live { "/healthz" } else { "/readyz" };
    match status(args, path) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(code) => {
            eprintln!("palisade health: {path} answered {code}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("palisade health: {}{path}: {e}", args.admin);
            ExitCode::from(1)
        }
    }
}

fn status(args: &HealthArgs, path: &str) -> std::io::Result<u16> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let mut s = TcpStream::connect_timeout(&args.admin, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        args.admin
    )?;
    // The status line is all we need; the body is a word.
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < head.len() {
        match s.read(&mut head[len..])? {
            0 => break,
            n => len += n,
        }
    }
    std::str::from_utf8(&head[..len])
        .ok()
        .and_then(|h| h.strip_prefix("HTTP/1.1 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))
}
