//! The `palisade` binary as a user runs it.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Kills the child if a test fails before it would have.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn palisade() -> Command {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
}

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn config_default_is_a_valid_config() {
    let out = palisade().args(["config", "default"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("rate = 100"));
    let path = temp_file("default.toml", &text);
    let out = palisade().arg("check-config").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}: ok\n", path.display())
    );
}

#[test]
fn check_config_names_file_line_column_and_key() {
    let path = temp_file(
        "bad.toml",
        "[server]\nupstreams = [\"http://127.0.0.1:1\"]\n\n[rate_limit]\nburst = 0\n",
    );
    let out = palisade().arg("check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        format!(
            "{}:5:1: rate_limit.burst: must be between 1 and 10000000\n",
            path.display()
        )
    );
    let out = palisade()
        .args(["check-config", "/nonexistent/palisade.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("/nonexistent/palisade.toml: "));
}

/// Reads the child's log until the "palisade running" line; returns the proxy address.
fn proxy_addr(stderr: &mut impl BufRead) -> SocketAddr {
    let mut line = String::new();
    for _ in 0..50 {
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(rest) = line.split("proxy=").nth(1) {
            return rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    }
    panic!("no 'palisade running' line; last: {line}");
}

/// The raw response, or `RESET` when the server reset the connection.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = String::new();
    let sent = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    match sent.and_then(|()| s.read_to_string(&mut out)) {
        Ok(_) => out,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "RESET".into(),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn run_serves_then_exits_cleanly_on_sigterm() {
    let (demo_addr, _demo) = {
        let mut child = palisade()
            .args(["demo-upstream", "--listen", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        let addr: SocketAddr = line.rsplit("http://").next().unwrap().trim().parse().unwrap();
        (addr, Reaped(child))
    };
    let config = temp_file("run.toml", "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n");
    let mut child = Reaped(
        palisade()
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--rate-limit",
                "3",
                "--config",
            ])
            .arg(&config)
            .arg("--upstream")
            .arg(format!("http://{demo_addr}"))
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut err = BufReader::new(child.0.stderr.take().unwrap());
    let proxy = proxy_addr(&mut err);
    let statuses: Vec<String> = (0..5)
        .map(|_| get(proxy, "/").lines().next().unwrap_or_default().to_string())
        .collect();
    // --rate-limit 3 wins over the file's default of 100.
    assert_eq!(
        statuses.iter().filter(|s| s.contains(" 200 ")).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| s.contains(" 429 ")).count(),
        2,
        "{statuses:?}"
    );
    let pid = child.0.id().to_string();
    // SIGHUP reloads the file: deny ourselves, and see it applied (denied
    // sources are reset at accept).
    std::fs::write(
        &config,
        "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n[clients]\ndeny = [\"127.0.0.1\"]\n",
    )
    .unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut denied = false;
    for _ in 0..50 {
        if get(proxy, "/") == "RESET" {
            denied = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(denied, "SIGHUP did not apply the new deny list");
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.0.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("SIGHUP: reloading config"), "{rest}");
    assert!(rest.contains("config reloaded"), "{rest}");
    assert!(rest.contains("stopped"), "{rest}");
}

#[test]
fn json_logs_carry_the_decision_and_the_client() {
    let config = temp_file("json.toml", "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n");
    let mut child = Reaped(
        palisade()
            .args([
                "--log-format",
                "json",
                "run",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
            .args(["--rate-limit", "1", "--config"])
            .arg(&config)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut err = BufReader::new(child.0.stderr.take().unwrap());
    let mut line = String::new();
    let mut proxy = None;
    for _ in 0..50 {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["message"] == "palisade running" {
            proxy = Some(v["proxy"].as_str().unwrap().parse::<SocketAddr>().unwrap());
            break;
        }
    }
    let proxy = proxy.expect("no 'palisade running' line");
    // The first request passes (and fails upstream: 502), the second is refused.
    get(proxy, "/");
    assert!(get(proxy, "/").starts_with("HTTP/1.1 429 "));
    let mut refused = None;
    for _ in 0..50 {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["message"] == "refused" {
            refused = Some(v);
            break;
        }
    }
    let v = refused.expect("no 'refused' log line");
    assert_eq!(v["reason"], "rate_limited");
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["level"], "INFO");
}
