//! Helpers the tests share.
#![allow(clippy::unwrap_used, dead_code)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Child;

use std::time::Duration;

use palisade_kernel::netns::Netns;

/// A child process killed and reaped when dropped, whatever the test did.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` over a fresh connection from inside `ns`, optionally bound
/// to `from`: the raw response, or None when the connection fails.
pub fn get(ns: &Netns, from: Option<&str>, to: &str, path: &str) -> Option<String> {
    let (from, to, path) = (from.map(str::to_owned), to.to_owned(), path.to_owned());
    ns.enter(move || {
        let to: SocketAddr = to.parse().unwrap();
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if let Some(f) = from {
            s.bind(&format!("{f}:0").parse::<SocketAddr>().unwrap().into())
                .unwrap();
        }
        s.connect_timeout(&to.into(), Duration::from_millis(700)).ok()?;
        let mut s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
    .join()
    .unwrap()
}

/// Reads a starting daemon's log up to the line that names both its proxy
/// and admin addresses, and returns that line; the rest is drained in the
/// background, so that a full pipe never blocks the daemon.
pub fn running_line(child: &mut Child) -> String {
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "palisade exited before it ran; its log:\n{seen}"
        );
        seen.push_str(&line);
        if log_addr(&line, "proxy").is_some() && log_addr(&line, "admin").is_some() {
            std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
            return line;
        }
    }
}

/// The address after ` NAME=` in a log line.
pub fn log_addr(line: &str, name: &str) -> Option<SocketAddr> {
    line.split(&format!(" {name}="))
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
