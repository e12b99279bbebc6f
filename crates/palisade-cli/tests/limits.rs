//! Limits as users write them, through a running `palisade` and curl: a
//! login route at 5 a minute.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

mod common;
use common::{log_addr, running_line};

/// Kills the daemon if a test fails before it would have.
struct Daemon {
    child: Child,
    proxy: SocketAddr,
    dir: PathBuf,
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

/// A directory of the test's own.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-limits-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The demo upstream, on a runtime thread of its own.
fn upstream() -> SocketAddr {
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

/// Starts `palisade run` on a config whose `[server]` and `[admin]` are
/// filled in here, plus `extra`; waits for its "palisade running" line.
fn start(dir: &Path, extra: &str) -> Daemon {
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
        dir: dir.to_owned(),
    };
    d.proxy = log_addr(&running_line(&mut d.child), "proxy").unwrap();
    d
}

/// Six GETs of a 5-a-minute route on one curl connection: five
/// pass, the sixth is refused for the rest of the 12 s one request takes to
/// drip back (a host stalled for 12 s between them would let it pass).
#[test]
fn a_login_route_at_five_a_minute_refuses_the_sixth_with_its_retry_after() {
    let dir = temp_dir("login");
    let d = start(
        &dir,
        "[[routes]]\nname = \"login\"\npath_prefix = \"/status\"\nrate = \"5/m\"\n",
    );
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "30", "-w"])
        .arg("%{http_code} %header{retry-after} %header{ratelimit-policy}\\n")
        .arg(format!("http://{}/status/200?[1-6]", d.proxy))
        .output()
        .expect("curl must be installed");
    assert!(out.status.success(), "curl failed: {out:?}");
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    for l in &lines[..5] {
        assert!(l.starts_with("200 "), "{lines:?}");
    }
    let refused: Vec<&str> = lines[5].split(' ').collect();
    assert_eq!(refused[0], "429", "{lines:?}");
    let retry: u64 = refused[1].parse().unwrap();
    assert!((1..=12).contains(&retry), "retry-after {retry}");
    assert_eq!(refused[2], "\"login\";q=5;w=60");
}
