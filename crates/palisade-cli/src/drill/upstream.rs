//! What the demo upstream is holding, read from its own `/stats` inside
//! its namespace (the attackers' namespace has no route to it): requests
//! it received and still answers, by kind. The slow and HTTP/2 attacks
//! use distinct kinds of request, so their count is theirs alone.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::Context as _;

use super::attack::Ctx;
use super::daemon;

/// Requests of one kind: received in all, and still being answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub received: u64,
    pub in_flight: u64,
}

/// The upstream's count of `kind` (`post`, `bytes`, `delay`, ...).
pub async fn held(ctx: &Ctx, kind: &'static str) -> anyhow::Result<Held> {
    let ns = ctx.upstream_ns.clone();
    let addr = ctx.upstream;
    let text = tokio::task::spawn_blocking(move || daemon::in_ns(&ns, move || stats(addr)))
        .await
        .context("the upstream probe panicked")??
        .context("reading the demo upstream's /stats")?;
    parse(&text, kind).with_context(|| format!("no {kind} line in the demo upstream's /stats"))
}

fn stats(addr: std::net::SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /stats HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned())
}

fn parse(text: &str, kind: &str) -> Option<Held> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == kind).then_some(())?;
        Some(Held {
            received: f.next()?.parse().ok()?,
            in_flight: f.next()?.parse().ok()?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_is_read_off_its_line() {
        let text = "root 900 1\npost 64 3\nbytes 0 0\n";
        assert_eq!(
            parse(text, "post"),
            Some(Held {
                received: 64,
                in_flight: 3
            })
        );
        assert_eq!(parse(text, "delay"), None);
    }
}
