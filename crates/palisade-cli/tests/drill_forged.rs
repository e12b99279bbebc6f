//! The drill's forged-records attack against a real `palisade run` in
//! cluster mode on a real redis-server: the node refuses every forged
//! record it reads (counted as unauthenticated), applies none of the
//! forged bans (a ban of 0.0.0.0/0 would cut every client off), and keeps
//! serving; the drill takes its records out again.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::Commands as _;

mod common;

// The module under test, compiled into this test: the binary's modules are
// not a library an integration test can link.
#[path = "../src/drill/forged.rs"]
#[allow(dead_code)]
mod forged;

struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh redis-server on a free port, or `None` after saying why
/// (under `CI`, its absence is a failure: `scripts/test` installs it).
fn redis_server() -> Option<(RedisServer, String)> {
    if Command::new("redis-server").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "redis-server is missing in CI");
        eprintln!("skipped: redis-server is not installed");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let server = RedisServer(child);
    let url = format!("redis://127.0.0.1:{port}/");
    for _ in 0..200 {
        if redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .is_ok()
        {
            return Some((server, url));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("redis-server on {port} never answered");
}

/// Status code and body of `GET path` at `to`.
fn get(to: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (code, body)
}

#[test]
fn forged_records_are_refused_and_the_node_keeps_serving() {
    let Some((_server, url)) = redis_server() else {
        return;
    };
    let dir = common::temp_dir("drill_forged", "refused");
    let d = common::start(
        &dir,
        &format!(
            "[cluster]\nredis = \"{url}\"\nnode_name = \"drill-node\"\n\
             key = \"drill-test-cluster-key-0123456789\"\nsync_interval = \"20ms\"\n\
             [syn]\nfirewall = \"dry-run\"\nxdp = \"off\"\nnever_ban_loopback = false\n"
        ),
    );
    assert_eq!(get(d.proxy, "/").0, 200);
    let mut c = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    // A real node's record next to the forged ones must survive removal.
    let () = c.hset("{palisade}:bans", "198.18.9.99/32", "real").unwrap();

    let f = forged::Forgery {
        prefix: "palisade".to_owned(),
        victims: vec![Ipv4Addr::LOCALHOST],
        // The shared window of a config without routes.
        windows: vec!["default".to_owned()],
        now_ms: palisade_core::unix_now_ms(),
    };
    let before = forged::unauthenticated(&get(d.admin, "/metrics").1);
    let planted = f.plant(&url).unwrap();
    for (hash, field, value) in f.fields() {
        let got: String = c.hget(&hash, &field).unwrap();
        assert_eq!(got, value);
    }
    // The node reads the stream every sync and the heartbeats every
    // second: the 3 forged events and the forged heartbeat.
    let mut refused = 0;
    for _ in 0..1_000 {
        refused = forged::unauthenticated(&get(d.admin, "/metrics").1) - before;
        if refused >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(refused >= 4, "{refused} forged records refused");
    for _ in 0..20 {
        assert_eq!(get(d.proxy, "/").0, 200, "a forged record cut the client off");
    }
    let bans = get(d.admin, "/api/v1/bans").1;
    assert!(
        !bans.contains("0.0.0.0/0") && !bans.contains("127.0.0.1"),
        "{bans}"
    );

    f.remove(&url, &planted).unwrap();
    let left: Vec<String> = c.hkeys("{palisade}:bans").unwrap();
    assert_eq!(left, ["198.18.9.99/32"]);
    for (hash, field, _) in f.fields() {
        let there: bool = c.hexists(&hash, &field).unwrap();
        assert!(!there, "{hash} {field} left behind");
    }
    let events: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg("{palisade}:events")
        .arg("-")
        .arg("+")
        .query(&mut c)
        .unwrap();
    let mallory = format!("{events:?}").matches(forged::MALLORY).count();
    assert_eq!(mallory, 0, "{events:?}");
}
