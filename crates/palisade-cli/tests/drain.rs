//! SIGTERM drains without dropping a request: a real daemon, real sockets.
//! `/readyz` turns 503 first; for `server.drain_delay` the proxy goes on
//! accepting and serving, on new connections and on kept-alive ones; then it
//! stops accepting, lets what is in flight finish (its response says
//! `Connection: close`) and exits 0.
//!
//! The upstream is a tiny server of the test's own whose `/slow` answers
//! only when the test says so: the test knows a request is in flight, and
//! no assertion depends on how fast this machine is.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Kills the child if a test fails before it would have.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An upstream whose `GET /slow` reports its arrival, then waits for a
/// release before it answers; every other path answers `ok` at once.
struct Gated {
    addr: SocketAddr,
    arrived: Receiver<()>,
    release: Sender<()>,
}

fn gated_upstream() -> Gated {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = channel();
    let (release, release_rx) = channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (arrived_tx, release_rx) = (arrived_tx.clone(), release_rx.clone());
            std::thread::spawn(move || {
                let mut conn = BufReader::new(stream);
                // Requests the proxy forwards here are bodiless GETs.
                while let Some((path, _)) = read_head(&mut conn, false) {
                    if path == "/slow" {
                        let _ = arrived_tx.send(());
                        let _ = release_rx.lock().unwrap().recv();
                    }
                    let body = if path == "/slow" { "slow\n" } else { "ok\n" };
                    let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    if conn.get_mut().write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Gated {
        addr,
        arrived,
        release,
    }
}

/// Reads one message head: its first line's second word (path or status)
/// and the header lines, lowercased. With `body`, also reads a
/// `Content-Length` body and appends it. None at a clean end of stream.
fn read_head(conn: &mut BufReader<TcpStream>, body: bool) -> Option<(String, String)> {
    let mut first = String::new();
    if conn.read_line(&mut first).ok()? == 0 {
        return None;
    }
    let word = first.split(' ').nth(1)?.to_owned();
    let mut headers = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).ok()?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let line = line.to_ascii_lowercase();
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        headers.push_str(&line);
    }
    if body {
        let mut bytes = vec![0; length];
        conn.read_exact(&mut bytes).ok()?;
        headers.push_str(&String::from_utf8_lossy(&bytes));
    }
    Some((word, headers))
}

/// One client connection kept alive across requests.
struct Client(BufReader<TcpStream>);

impl Client {
    fn connect(addr: SocketAddr) -> Self {
        Self::try_connect(addr).unwrap_or_else(|| panic!("connect {addr}: refused"))
    }

    fn try_connect(addr: SocketAddr) -> Option<Self> {
        let s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Some(Self(BufReader::new(s)))
    }

    fn send(&mut self, path: &str) {
        write!(self.0.get_mut(), "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    }

    /// The status and the (lowercased) headers followed by the body; a
    /// reset or a closed connection fails the test.
    fn response(&mut self, path: &str) -> (u16, String) {
        let (status, rest) = read_head(&mut self.0, true)
            .unwrap_or_else(|| panic!("GET {path}: no response (connection reset or closed)"));
        (status.parse().unwrap(), rest)
    }

    fn get(&mut self, path: &str) -> (u16, String) {
        self.send(path);
        self.response(path)
    }

    /// Whether the server has closed the connection (EOF, not a timeout).
    fn closed_by_server(&mut self) -> bool {
        let mut byte = [0; 1];
        matches!(self.0.read(&mut byte), Ok(0))
    }
}

/// `GET path` on a fresh connection: the status, or None when the
/// connection is refused.
fn get_new(addr: SocketAddr, path: &str) -> Option<u16> {
    Some(Client::try_connect(addr)?.get(path).0)
}

struct Daemon {
    child: Reaped,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<String>>,
    dir: PathBuf,
}

fn start(upstream: SocketAddr, drain_delay: &str) -> Daemon {
    let dir = std::env::temp_dir().join(format!("palisade-drain-{}-{drain_delay}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("palisade.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"http://{upstream}\"]\n\
             drain_delay = \"{drain_delay}\"\nshutdown_grace = \"1h\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[syn]\nenabled = false\n"
        ),
    )
    .unwrap();
    let mut child = Reaped(
        Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut err = BufReader::new(child.0.stderr.take().unwrap());
    let mut seen = String::new();
    let addrs = loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("no 'palisade running' line; log:\n{seen}");
        }
        seen.push_str(&line);
        let field = |name: &str| -> Option<SocketAddr> {
            line.split(name).nth(1)?.split_whitespace().next()?.parse().ok()
        };
        if let (Some(proxy), Some(admin)) = (field("proxy="), field("admin=")) {
            break (proxy, admin);
        }
    };
    // Keep reading, so the daemon never blocks on a full pipe.
    let log = Arc::new(Mutex::new(seen));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    Daemon {
        child,
        proxy: addrs.0,
        admin: addrs.1,
        log,
        dir,
    }
}

impl Daemon {
    fn signal(&self, name: &str) {
        let pid = self.child.0.id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{name}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    fn readyz(&self) -> Option<u16> {
        get_new(self.admin, "/readyz")
    }

    /// Polls `/readyz` until it answers 503 (bounded: a daemon that never
    /// turns unready fails here instead of hanging).
    fn wait_unready(&self) {
        for _ in 0..300 {
            if self.readyz() == Some(503) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("/readyz never answered 503; log:\n{}", self.log());
    }

    /// Polls until a new connection to the proxy is refused. A connection
    /// that gets through may still be in the backlog when the listener
    /// closes, so it is dropped unused.
    fn wait_refused(&self) {
        for _ in 0..600 {
            if TcpStream::connect(self.proxy).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the proxy never stopped accepting; log:\n{}", self.log());
    }

    fn exits_0(mut self) {
        let status = self.child.0.wait().unwrap();
        assert!(status.success(), "exit status {status:?}; log:\n{}", self.log());
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

/// The delay is an hour, so every request of the "during the delay" part
/// is certainly inside it on any machine; the second signal (Ctrl-C) ends
/// it, as an operator in a hurry would.
#[test]
fn sigterm_keeps_serving_through_the_drain_delay_and_a_second_signal_ends_it() {
    let upstream = gated_upstream();
    let daemon = start(upstream.addr, "1h");
    assert_eq!(daemon.readyz(), Some(200));
    let mut idle = Client::connect(daemon.proxy);
    let mut busy = Client::connect(daemon.proxy);
    assert_eq!(idle.get("/").0, 200);
    assert_eq!(busy.get("/").0, 200);

    daemon.signal("TERM");
    daemon.wait_unready();
    // Still accepting and serving, on new connections and kept-alive ones;
    // keep-alive is not withdrawn yet.
    for i in 0..10 {
        assert_eq!(get_new(daemon.proxy, "/"), Some(200), "new connection {i}");
    }
    for i in 0..3 {
        let (status, rest) = idle.get("/");
        assert_eq!(status, 200, "kept-alive request {i}");
        assert!(!rest.contains("connection: close"), "{rest}");
    }
    busy.send("/slow");
    upstream.arrived.recv().unwrap();
    assert_eq!(daemon.readyz(), Some(503));

    daemon.signal("INT");
    daemon.wait_refused();
    // The idle kept-alive connection is closed; the one with a request in
    // flight gets its response, told that the connection closes, then EOF.
    assert!(idle.closed_by_server());
    upstream.release.send(()).unwrap();
    let (status, rest) = busy.response("/slow");
    assert_eq!(status, 200);
    assert!(rest.contains("connection: close"), "{rest}");
    assert!(rest.ends_with("slow\n"), "{rest}");
    assert!(busy.closed_by_server());
    let log = daemon.log();
    daemon.exits_0();
    assert!(log.contains("drain delay cut short"), "{log}");
}

/// A short delay left to run out by itself: a request in flight across
/// its end completes, new connections are refused after it.
#[test]
fn the_drain_delay_runs_out_then_in_flight_requests_finish() {
    let upstream = gated_upstream();
    let daemon = start(upstream.addr, "2s");
    let mut busy = Client::connect(daemon.proxy);
    assert_eq!(busy.get("/").0, 200);
    busy.send("/slow");
    upstream.arrived.recv().unwrap();

    daemon.signal("TERM");
    daemon.wait_unready();
    daemon.wait_refused();
    upstream.release.send(()).unwrap();
    let (status, rest) = busy.response("/slow");
    assert_eq!(status, 200);
    assert!(rest.contains("connection: close"), "{rest}");
    assert!(busy.closed_by_server());
    let log = daemon.log();
    daemon.exits_0();
    assert!(!log.contains("drain delay cut short"), "{log}");
}
