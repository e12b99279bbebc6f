//! `--redis` from inside the drill. Palisade runs in the server namespace,
//! which routes only 198.18.0.0/15, so the Redis (on this host's loopback,
//! or wherever the host reaches it) is relayed in: a listener on the server
//! namespace's loopback, each connection carried on from a thread in the
//! namespace the drill started in. The forged records are written from
//! there too.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::OnceLock;

use anyhow::{Context as _, bail};

use super::lab::Lab;

/// Where the relay listens inside the server namespace.
pub const PORT: u16 = 6380;

/// The namespace the drill started in, opened before it left it.
static HOST: OnceLock<std::fs::File> = OnceLock::new();

/// Keeps a handle on the calling thread's namespace (the host's), for
/// [`in_host`]; call it before entering another.
pub fn remember_host() -> anyhow::Result<()> {
    let ns =
        std::fs::File::open("/proc/thread-self/ns/net").context("opening this thread's network namespace")?;
    let _ = HOST.set(ns);
    Ok(())
}

fn enter_host() -> io::Result<()> {
    let ns = HOST
        .get()
        .ok_or_else(|| io::Error::other("the host's network namespace was not kept"))?;
    // SAFETY: setns on a namespace fd we hold open affects only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread of its own in the host's namespace.
pub fn in_host<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    std::thread::spawn(move || enter_host().map(|()| f()))
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in the host's namespace panicked"))?
        .context("entering the host's network namespace")
}

/// `url` pointed at the relay (user, password and database kept), and
/// the `host:port` the relay carries its connections to.
pub fn relayed(url: &str) -> anyhow::Result<(String, String)> {
    if url.contains(',') {
        bail!("--redis: one redis:// URL (a Redis Cluster's seeds cannot be relayed into the drill)");
    }
    let Some(rest) = url.strip_prefix("redis://") else {
        bail!(
            "--redis: a redis:// URL (rediss:// cannot be relayed into the drill: its certificate would not name the relay)"
        );
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let (user, hostport) = authority
        .rsplit_once('@')
        .map_or(("", authority), |(u, h)| (u, h));
    let has_port = hostport.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
    let target = if has_port {
        hostport.to_owned()
    } else {
        format!("{hostport}:6379")
    };
    if hostport.is_empty() {
        bail!("--redis: no host in {url}");
    }
    let user = if user.is_empty() {
        String::new()
    } else {
        format!("{user}@")
    };
    Ok((format!("redis://{user}127.0.0.1:{PORT}/{path}"), target))
}

/// Starts the relay in `ns` (the server namespace) towards `target`.
pub fn start(ns: &str, target: String) -> anyhow::Result<()> {
    let ns = ns.to_owned();
    let listener = std::thread::spawn(move || {
        Lab::enter(&ns)?;
        TcpListener::bind(("127.0.0.1", PORT)).context("listening for the Redis relay")
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the relay's listener thread panicked"))??;
    std::thread::spawn(move || {
        for inbound in listener.incoming().flatten() {
            let target = target.clone();
            std::thread::spawn(move || {
                if enter_host().is_err() {
                    return;
                }
                if let Ok(outbound) = TcpStream::connect(&target) {
                    splice(inbound, outbound);
                }
            });
        }
    });
    Ok(())
}

/// Copies both ways until either side ends.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let back = std::thread::spawn(move || {
        let _ = io::copy(&mut b2, &mut a2);
        let _ = a2.shutdown(std::net::Shutdown::Write);
    });
    let (mut a, mut b) = (a, b);
    let _ = io::copy(&mut a, &mut b);
    let _ = b.shutdown(std::net::Shutdown::Write);
    let _ = back.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_points_at_the_relay_and_keeps_the_rest() {
        assert_eq!(
            relayed("redis://127.0.0.1:16379/").unwrap(),
            (format!("redis://127.0.0.1:{PORT}/"), "127.0.0.1:16379".to_owned())
        );
        assert_eq!(
            relayed("redis://:secret@cache.lan/2").unwrap(),
            (
                format!("redis://:secret@127.0.0.1:{PORT}/2"),
                "cache.lan:6379".to_owned()
            )
        );
        assert_eq!(relayed("redis://[::1]:7000").unwrap().1, "[::1]:7000");
        assert!(relayed("rediss://h:1/").is_err());
        assert!(relayed("redis://a:1,redis://b:2").is_err());
    }
}
