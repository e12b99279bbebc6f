//! Helpers the tests share.
#![allow(clippy::unwrap_used, dead_code)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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

/// Starts `palisade run --config CONFIG` in `ns` under `prefix` (setpriv …,
/// or nothing) and reads at most `lines` lines of its log for it to say it
/// runs. What it logs from then on goes to `log_file`, or nowhere; what it
/// logged until then is returned with it.
pub fn start_in(
    ns: &Netns,
    prefix: &[String],
    config: &Path,
    log_file: Option<&Path>,
    lines: usize,
) -> (Reaped, String) {
    let mut child = Reaped(
        Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .args(prefix)
            .args([env!("CARGO_BIN_EXE_palisade"), "run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut err = BufReader::new(child.0.stderr.take().unwrap());
    let mut log = String::new();
    for _ in 0..lines {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        log.push_str(&line);
        if line.contains("palisade running") {
            match log_file {
                Some(path) => {
                    let file = std::fs::File::create(path).unwrap();
                    std::thread::spawn(move || std::io::copy(&mut err, &mut &file));
                }
                None => {
                    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
                }
            }
            return (child, log);
        }
    }
    panic!("palisade did not start under {prefix:?}:\n{log}");
}

/// The demo upstream inside `ns`, listening on `listen`.
pub fn demo_in(ns: &Netns, listen: &str) -> Reaped {
    Reaped(
        Command::new("ip")
            .args(["netns", "exec", ns.name(), env!("CARGO_BIN_EXE_palisade")])
            .args(["demo-upstream", "--listen", listen])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A `palisade run` on loopback, killed if a test fails before it would
/// have been; its directory is removed unless the test failed.
pub struct Daemon {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test's files stay, to be read.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A fresh directory of the test's own, named for the test file and test.
pub fn temp_dir(file: &str, test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-{file}-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The demo upstream, in process on a runtime thread of its own.
pub fn upstream() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (addr, serve) = palisade_proxy::demo::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            tx.send(addr).unwrap();
            serve.await;
        });
    });
    rx.recv().unwrap()
}

/// Starts `palisade run` in `dir` on a config whose `[server]` and `[admin]`
/// are filled in here (loopback, kernel-picked ports, the demo upstream),
/// plus `extra`; returns once its "palisade running" line is out.
pub fn start(dir: &Path, extra: &str) -> Daemon {
    let config = dir.join("palisade.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"http://{}\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n{extra}",
            upstream()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut d = Daemon {
        child,
        proxy: unknown,
        admin: unknown,
        dir: dir.to_owned(),
    };
    let line = running_line(&mut d.child);
    d.proxy = log_addr(&line, "proxy").unwrap();
    d.admin = log_addr(&line, "admin").unwrap();
    d
}
