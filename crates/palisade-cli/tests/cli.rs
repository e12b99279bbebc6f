//! The `palisade` binary as a user runs it.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
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

/// `palisade GLOBAL… run` with its proxy and admin on ports the kernel
/// picks, read back from its log.
fn run_anywhere(global: &[&str]) -> Command {
    let mut cmd = palisade();
    cmd.args(global)
        .args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    cmd
}

/// `palisade store build` from `csv` to `store`, which must succeed.
fn store_build(csv: &Path, store: &Path) -> std::process::Output {
    let out = palisade()
        .args(["store", "build", "--input"])
        .arg(csv)
        .arg("--output")
        .arg(store)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
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
    let out = palisade().args(["config", "check"]).arg(&path).output().unwrap();
    // EX_CONFIG: systemd's RestartPreventExitStatus=78 stops restarting on it.
    assert_eq!(out.status.code(), Some(78));
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
    assert_eq!(out.status.code(), Some(78));
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

/// SIGTERM, then, once `/readyz` shows the drain has begun, a second one
/// (Ctrl-C twice): the daemon stops without waiting out `server.drain_delay`.
fn terminate_twice(pid: &str, admin: SocketAddr) {
    let kill = || {
        assert!(
            Command::new("kill")
                .args(["-TERM", pid])
                .status()
                .unwrap()
                .success()
        );
    };
    let ready = || {
        let Ok(mut s) = TcpStream::connect(admin) else {
            return false;
        };
        let mut out = String::new();
        write!(
            s,
            "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .and_then(|()| s.read_to_string(&mut out))
        .is_ok_and(|_| out.starts_with("HTTP/1.1 200 "))
    };
    kill();
    for _ in 0..500 {
        if !ready() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill();
}

#[test]
fn run_serves_then_exits_cleanly_on_sigterm() {
    let (demo_addr, _demo) = demo_upstream();
    let config = temp_file(
        "run.toml",
        "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n[syn]\nenabled = false\n",
    );
    let mut child = Reaped(
        run_anywhere(&[])
            .args(["--rate-limit", "3", "--config"])
            .arg(&config)
            .arg("--upstream")
            .arg(format!("http://{demo_addr}"))
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut err = BufReader::new(child.0.stderr.take().unwrap());
    let (proxy, admin, _) = running_addrs(&mut err);
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
        "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n[syn]\nenabled = false\n[clients]\ndeny = [\"127.0.0.1\"]\n",
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
    terminate_twice(&pid, admin);
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
    let config = temp_file(
        "json.toml",
        "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n[syn]\nenabled = false\n",
    );
    let mut child = Reaped(
        run_anywhere(&["--log-format", "json"])
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

/// Reads the child's log up to the "palisade running" line: (proxy, admin, lines).
fn running_addrs(stderr: &mut impl BufRead) -> (SocketAddr, SocketAddr, String) {
    let mut seen = String::new();
    for _ in 0..50 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        let field = |name: &str| -> Option<SocketAddr> {
            line.split(name).nth(1)?.split_whitespace().next()?.parse().ok()
        };
        if let (Some(proxy), Some(admin)) = (field("proxy="), field("admin=")) {
            return (proxy, admin, seen);
        }
    }
    panic!("no 'palisade running' line; log so far:\n{seen}");
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t0ken-0123456789\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn json_body(response: &str) -> serde_json::Value {
    serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap()
}

#[test]
fn acknowledged_scores_survive_kill_9_and_a_torn_log() {
    let dir = std::env::temp_dir().join(format!("palisade-cli-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = temp_file(
        "state.toml",
        &format!(
            "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n[syn]\nenabled = false\n[admin]\ntoken = \"t0ken-0123456789\"\n[state]\ndata_dir = \"{}\"\n",
            dir.display()
        ),
    );
    let start = || {
        let mut child = run_anywhere(&[])
            .arg("--config")
            .arg(&config)
            .env_remove("PALISADE_ADMIN_TOKEN")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let (proxy, admin, log) = running_addrs(&mut err);
        // Keep draining the log so the child never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        (Reaped(child), proxy, admin, log)
    };
    let (mut first, _, admin, _) = start();
    for (ip, score) in [("127.0.0.1", 5), ("10.1.2.3", 12), ("10.9.9.9", 20)] {
        let r = http(
            admin,
            "PUT",
            &format!("/api/v1/reputation/{ip}"),
            &format!("{{\"score\": {score}}}"),
        );
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert_eq!(json_body(&r)["durable"], true);
    }
    let r = http(admin, "DELETE", "/api/v1/reputation/10.9.9.9", "");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Acknowledged above; now the hardest stop there is.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    // And a write torn by the crash at the end of the log.
    let mut wal = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("state.wal"))
        .unwrap();
    wal.write_all(&[0x5a; 30]).unwrap();
    drop(wal);

    let (_second, proxy, admin, log) = start();
    assert!(
        log.contains("cut 30 bytes"),
        "the torn tail was not reported:\n{log}"
    );
    assert!(log.contains("clients=2"), "{log}");
    let explain = json_body(&http(admin, "GET", "/api/v1/reputation/127.0.0.1", ""));
    let score = explain["score"].as_f64().unwrap();
    // 5 points, plus at most a few seconds of recovery at 1 point/minute.
    assert!((5.0..6.0).contains(&score), "{explain}");
    assert_eq!(explain["events"][0]["kind"], "restored", "{explain}");
    assert!(
        get(proxy, "/").starts_with("HTTP/1.1 403"),
        "a restored low score must block"
    );
    let other = json_body(&http(admin, "GET", "/api/v1/reputation/10.1.2.3", ""));
    assert!(
        (12.0..13.0).contains(&other["score"].as_f64().unwrap()),
        "{other}"
    );
    let cleared = json_body(&http(admin, "GET", "/api/v1/reputation/10.9.9.9", ""));
    assert_eq!(cleared["score"], 70.0, "a cleared client came back: {cleared}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn store_commands_build_query_patch_and_describe() {
    let csv = temp_file(
        "feed.csv",
        "ip,score,reason\n192.0.2.1,10,spam\n198.51.100.0/24,0,botnet,deny\n2001:db8::1,40\n",
    );
    let store = csv.with_file_name("feed.pstore");
    let out = store_build(&csv, &store);
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 entries"));

    let lookup = |input: &str| {
        let mut child = palisade()
            .args(["store", "lookup", "--store"])
            .arg(&store)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = lookup("192.0.2.1\n198.51.100.77\n203.0.113.5\n2001:db8::1\n");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "192.0.2.1 10\n198.51.100.77 0 deny\n203.0.113.5 -\n2001:db8::1 40\n"
    );
    let out = lookup("192.0.2.1\nnot-an-ip\n");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "stdin:2: \"not-an-ip\" is not an IP address\n"
    );

    let delta = temp_file(
        "d.delta",
        "palisade-delta 1 from=0 to=1\n-,192.0.2.1\n+,203.0.113.5,20,scan\nend ops=2 crc32=00000000\n",
    );
    let out = palisade()
        .args(["store", "apply-delta", "--store"])
        .arg(&store)
        .arg("--delta")
        .arg(&delta)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("d.delta:4: checksum mismatch"));
    let text = std::fs::read_to_string(&delta).unwrap();
    let body = &text[..text.find("end ").unwrap()];
    let fixed = format!("{body}end ops=2 crc32={:08x}\n", crc32(body.as_bytes()));
    std::fs::write(&delta, fixed).unwrap();
    let out = palisade()
        .args(["store", "apply-delta", "--store"])
        .arg(&store)
        .arg("--delta")
        .arg(&delta)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = lookup("192.0.2.1\n203.0.113.5\n");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "192.0.2.1 -\n203.0.113.5 20\n"
    );
    let out = palisade().args(["store", "info"]).arg(&store).output().unwrap();
    let info = String::from_utf8(out.stdout).unwrap();
    assert!(
        info.contains("watermark      1") && info.contains("ipv4_prefixes  1"),
        "{info}"
    );

    let bad = temp_file("bad.csv", "192.0.2.1,10\n192.0.2.300,5\n");
    let out = palisade()
        .args(["store", "build", "--input"])
        .arg(&bad)
        .arg("--output")
        .arg(bad.with_extension("pstore"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("bad.csv:2: \"192.0.2.300\" is not an IP address or CIDR"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CRC-32 (IEEE), as delta trailers use.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A `palisade demo-upstream` on an ephemeral port.
fn demo_upstream() -> (SocketAddr, Reaped) {
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
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Statuses of `n` GETs of `/` sent one after another on one keep-alive connection.
fn keepalive_statuses(addr: SocketAddr, n: usize) -> Vec<u16> {
    let mut s = BufReader::new(TcpStream::connect(addr).unwrap());
    s.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        write!(s.get_mut(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut line = String::new();
        s.read_line(&mut line).unwrap();
        statuses.push(line.split(' ').nth(1).unwrap().parse().unwrap());
        let mut length = 0;
        loop {
            line.clear();
            s.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        s.read_exact(&mut body).unwrap();
    }
    statuses
}

/// A service manager may reload the moment the port accepts: SIGHUP then
/// must neither kill the daemon (the default action) nor be lost. Before the
/// handlers were installed ahead of the listeners, the quickstart died of
/// every such SIGHUP and a config-file daemon of most.
#[test]
fn sighup_right_after_the_port_accepts_does_not_kill() {
    let (demo_addr, _demo) = demo_upstream();
    let config = temp_file(
        "hup.toml",
        "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n[syn]\nenabled = false\n",
    );
    for with_file in [false, true, false, true] {
        let port = free_port();
        let mut cmd = palisade();
        cmd.args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin",
            "127.0.0.1:0",
        ])
        .arg("--upstream")
        .arg(format!("http://{demo_addr}"));
        if with_file {
            cmd.arg("--config").arg(&config);
        }
        let mut child = Reaped(cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap());
        let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        while TcpStream::connect(proxy).is_err() {
            assert!(
                child.0.try_wait().unwrap().is_none(),
                "the daemon exited at start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = child.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        let mut err = BufReader::new(child.0.stderr.take().unwrap());
        let (_, admin, mut log) = running_addrs(&mut err);
        assert!(
            get(proxy, "/").starts_with("HTTP/1.1 200 "),
            "not serving after SIGHUP (config file: {with_file})"
        );
        assert!(child.0.try_wait().unwrap().is_none());
        terminate_twice(&pid, admin);
        let status = child.0.wait().unwrap();
        assert!(
            status.success(),
            "exit status {status:?} (config file: {with_file})"
        );
        err.read_to_string(&mut log).unwrap();
        let expected = if with_file {
            "SIGHUP: reloading config"
        } else {
            "SIGHUP: no config file to reload"
        };
        assert!(log.contains(expected), "{log}");
    }
}

/// `--rate-limit 1000`, with the built-in quickstart and with a file that
/// sets none of the derived keys: a burst of 500 from one client is all
/// admitted. Before, the quickstart pinned burst, window limit and flood
/// threshold at 100, and 100 of the 500 got a 200.
#[test]
fn rate_limit_flag_moves_burst_window_and_flood_threshold() {
    let (demo_addr, _demo) = demo_upstream();
    let config = temp_file(
        "rate.toml",
        "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n[syn]\nenabled = false\n[rate_limit]\nrate = 5\n",
    );
    for with_file in [false, true] {
        let mut cmd = palisade();
        cmd.args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--rate-limit", "1000", "--upstream"])
            .arg(format!("http://{demo_addr}"));
        if with_file {
            cmd.arg("--config").arg(&config);
        }
        let mut child = Reaped(cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap());
        let mut err = BufReader::new(child.0.stderr.take().unwrap());
        let proxy = proxy_addr(&mut err);
        let statuses = keepalive_statuses(proxy, 500);
        let ok = statuses.iter().filter(|s| **s == 200).count();
        assert_eq!(ok, 500, "{ok} of 500 admitted (config file: {with_file})");
    }
}

/// A token short enough to guess is refused at start, from the file or the
/// environment. Before, `token = "t0ken"` and `PALISADE_ADMIN_TOKEN=short` ran.
#[test]
fn short_admin_tokens_are_refused_at_load() {
    let config = temp_file(
        "short-token.toml",
        "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n[syn]\nenabled = false\n[admin]\ntoken = \"t0ken\"\n",
    );
    let out = palisade().arg("check-config").arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with(&format!(
            "{}:6:1: admin.token: must be at least 16 characters",
            config.display()
        )),
        "{err}"
    );
    let out = palisade()
        .args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--upstream", "http://127.0.0.1:9"])
        .env("PALISADE_ADMIN_TOKEN", "short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("PALISADE_ADMIN_TOKEN: must be at least 16 characters"),
        "{err}"
    );
}

/// A feed host on loopback: serves `files` by path to requests carrying
/// exactly `auth` as `Authorization` (401 otherwise), one request per
/// connection, and records every `Authorization` it was sent.
type Files = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>;

fn feed_host(
    files: Files,
    auth: &'static str,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let mut sent_auth = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("authorization")
                {
                    sent_auth = Some(value.trim().to_owned());
                }
            }
            log.lock().unwrap().push(sent_auth.clone().unwrap_or_default());
            let body = files.lock().unwrap().get(&path).cloned();
            let (status, body) = match body {
                _ if sent_auth.as_deref() != Some(auth) => ("401 Unauthorized", Vec::new()),
                Some(b) => ("200 OK", b),
                None => ("404 Not Found", Vec::new()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).and_then(|()| s.write_all(&body));
        }
    });
    (addr, seen)
}

fn delta_text(ops: &str) -> String {
    let body = format!("palisade-delta 1 from=0 to=1\n{ops}");
    let n = ops.lines().count();
    format!("{body}end ops={n} crc32={:08x}\n", crc32(body.as_bytes()))
}

/// Polls the admin API until `check` holds (generous: 30 s).
fn wait_for_store(
    admin: SocketAddr,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..300 {
        let store = json_body(&http(admin, "GET", "/api/v1/store", ""));
        if check(&store) {
            return store;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("never happened: {what}");
}

/// The way an operator publishes a feed: `store keygen`, `store sign`, and
/// the daemon, fetching over HTTP with a credential from its environment,
/// applies the signed delta. One flipped byte and the delta is rejected
/// whole (logged, counted, the store unchanged). The credential appears in
/// no log line (at debug level), no error and no admin answer.
#[test]
fn a_signed_feed_end_to_end() {
    const SECRET: &str = "Bearer feed-credential-5f3a9c1e77";
    let dir = std::env::temp_dir().join(format!("palisade-cli-feed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let key = dir.join("feed.key");
    let out = palisade()
        .args(["store", "keygen", "--output"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(public.len(), 44, "{public}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pem = std::fs::read(&key).unwrap();
    let again = palisade()
        .args(["store", "keygen", "--output"])
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1), "an existing key was overwritten");
    assert_eq!(std::fs::read(&key).unwrap(), pem);

    let store = dir.join("rep.pstore");
    let csv = dir.join("rep.csv");
    std::fs::write(&csv, "192.0.2.1,10,spam\n").unwrap();
    store_build(&csv, &store);

    // With a feed key the snapshot must be signed too.
    let out = palisade()
        .args(["store", "sign"])
        .arg(&store)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let genuine = delta_text("+,198.51.100.7,0,feed,deny\n");
    let delta = dir.join("rep.delta");
    std::fs::write(&delta, &genuine).unwrap();
    let out = palisade()
        .args(["store", "sign"])
        .arg(&delta)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sig = std::fs::read(dir.join("rep.delta.sig")).unwrap();
    let verify = |file: &std::path::Path| {
        palisade()
            .args(["store", "verify"])
            .arg(file)
            .args(["--public-key", &public, "--signature"])
            .arg(dir.join("rep.delta.sig"))
            .output()
            .unwrap()
    };
    let out = verify(&delta);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // One byte of the address flipped: 198.51.100.7 becomes 198.51.100.6.
    let mut flipped = genuine.clone().into_bytes();
    let at = genuine.find("100.7").unwrap() + 4;
    flipped[at] ^= 1;
    let tampered = dir.join("tampered.delta");
    std::fs::write(&tampered, &flipped).unwrap();
    let out = verify(&tampered);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The feed host serves the tampered delta with the genuine signature.
    let files: Files = Default::default();
    files.lock().unwrap().insert("/rep.delta".into(), flipped);
    files.lock().unwrap().insert("/rep.delta.sig".into(), sig);
    let (host, auth_seen) = feed_host(files.clone(), SECRET);
    let config = dir.join("feed.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n[syn]\nenabled = false\n\
             [admin]\ntoken = \"t0ken-0123456789\"\n\
             [store]\npath = \"{}\"\nfeed = \"http://{host}/rep.delta\"\nfeed_allow_http = true\n\
             feed_public_key = \"{public}\"\nfeed_auth_env = \"PALISADE_TEST_FEED_AUTH\"\npoll_interval = \"100ms\"\n",
            store.display()
        ),
    )
    .unwrap();
    // The variable must exist when the config loads; the error names the key.
    let out = palisade()
        .args(["config", "check"])
        .arg(&config)
        .env_remove("PALISADE_TEST_FEED_AUTH")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("store.feed_auth_env") && err.contains("is not set"),
        "{err}"
    );

    let mut child = run_anywhere(&[])
        .arg("--config")
        .arg(&config)
        .env("PALISADE_TEST_FEED_AUTH", SECRET)
        .env("RUST_LOG", "debug")
        .env_remove("PALISADE_ADMIN_TOKEN")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let child = Reaped(child);
    let (_, admin, first_lines) = running_addrs(&mut err);
    let log = std::sync::Arc::new(std::sync::Mutex::new(first_lines));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while err.read_line(&mut line).unwrap_or(0) > 0 {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });

    let rejected = wait_for_store(admin, "the tampered delta rejected", |s| {
        s["feed"]["rejected"].as_u64() >= Some(1)
    });
    assert_eq!(rejected["watermark"], 0, "{rejected}");
    let error = rejected["feed"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("signature does not match") && error.contains("rejected whole"),
        "{rejected}"
    );
    assert_eq!(rejected["feed"]["public_key"], public.as_str());
    let metrics = http(admin, "GET", "/metrics", "");
    assert!(
        metrics.contains("palisade_feed_rejected_total{reason=\"bad_signature\"} 1"),
        "{metrics}"
    );
    let explain = http(admin, "GET", "/api/v1/reputation/198.51.100.6", "");
    assert_eq!(json_body(&explain)["store"], serde_json::Value::Null, "{explain}");

    // The publisher's delta goes through.
    files
        .lock()
        .unwrap()
        .insert("/rep.delta".into(), genuine.into_bytes());
    let applied = wait_for_store(admin, "the genuine delta applied", |s| s["watermark"] == 1);
    let explain = json_body(&http(admin, "GET", "/api/v1/reputation/198.51.100.7", ""));
    assert_eq!(explain["store"]["action"], "deny", "{explain}");

    let seen = auth_seen.lock().unwrap().clone();
    assert!(seen.len() >= 4, "{seen:?}");
    assert!(
        seen.iter().all(|a| a == SECRET),
        "a request went without the credential: {seen:?}"
    );
    let metrics = http(admin, "GET", "/metrics", "");
    drop(child);
    let log = log.lock().unwrap().clone();
    assert!(
        log.contains("reputation feed update rejected") && log.contains("bad_signature"),
        "the rejection was not logged:\n{log}"
    );
    let secret = SECRET.trim_start_matches("Bearer ");
    for (what, text) in [
        ("the log", log.as_str()),
        ("/api/v1/store", &rejected.to_string()),
        ("/api/v1/store", &applied.to_string()),
        ("/metrics", &metrics),
    ] {
        assert!(!text.contains(secret), "the credential is in {what}:\n{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A key made by OpenSSL signs with `palisade store sign`, and a
/// signature made by OpenSSL verifies with `palisade store verify`: the
/// key and signature formats are the standard ones.
#[test]
fn openssl_keys_and_signatures_interoperate() {
    let dir = std::env::temp_dir().join(format!("palisade-cli-openssl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(&dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", "k.pem"]);
    let der = openssl(&["pkey", "-in", "k.pem", "-pubout", "-outform", "DER"]);
    // SubjectPublicKeyInfo for Ed25519: a 12-byte prefix, then the 32 key bytes.
    let public: String = der[der.len() - 32..].iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(
        dir.join("body"),
        "palisade-delta 1 from=0 to=1\nend ops=0 crc32=00000000\n",
    )
    .unwrap();
    let out = palisade()
        .current_dir(&dir)
        .args(["store", "sign", "body", "--key", "k.pem"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ok = |sig: &str| {
        palisade()
            .current_dir(&dir)
            .args([
                "store",
                "verify",
                "body",
                "--public-key",
                &public,
                "--signature",
                sig,
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(ok("body.sig"));
    let raw = openssl(&["pkeyutl", "-sign", "-inkey", "k.pem", "-rawin", "-in", "body"]);
    assert_eq!(raw.len(), 64);
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.join("openssl.sig"), hex).unwrap();
    assert!(ok("openssl.sig"));
    let mut wrong = raw.clone();
    wrong[0] ^= 1;
    let hex: String = wrong.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.join("wrong.sig"), hex).unwrap();
    assert!(!ok("wrong.sig"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The task-leak watchdog end to end: connections that never end, opened
/// after the watchdog's first sample, grow the live task count; a minute
/// later the spawn site of client connections is named in a log line and
/// in `palisade_task_growth_alerts_total{site}`, once.
#[test]
fn a_leaking_task_site_is_named_in_the_log_and_the_alert_metric() {
    let (demo, _demo) = demo_upstream();
    let config = temp_file(
        "watchdog.toml",
        &format!(
            "[server]\nupstreams = [\"http://{demo}\"]\nidle_timeout = \"10m\"\n[syn]\nenabled = false\n\
             [admin]\ntoken = \"t0ken-0123456789\"\n[connections]\nnew_per_ip_per_second = 0\n\
             [watchdog]\ninterval = \"1s\"\nmin_tasks = 20\n"
        ),
    );
    let mut child = Reaped(
        run_anywhere(&["--log-format", "json"])
            .arg("--config")
            .arg(&config)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Log lines, read on a thread so that waiting for one is bounded.
    let (lines, log) = std::sync::mpsc::channel::<serde_json::Value>();
    let stderr = BufReader::new(child.0.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str(&line)
                && lines.send(v).is_err()
            {
                return;
            }
        }
    });
    // Waits at most `bound` for each line until one says `message`.
    let next = |message: &str, bound: Duration| -> serde_json::Value {
        loop {
            match log.recv_timeout(bound) {
                Ok(v) if v["message"] == message => return v,
                Ok(_) => {}
                Err(e) => panic!("no {message:?} log line: {e}"),
            }
        }
    };
    let running = next("palisade running", Duration::from_secs(30));
    let addr = |field: &str| running[field].as_str().unwrap().parse::<SocketAddr>().unwrap();
    let (proxy, admin) = (addr("proxy"), addr("admin"));
    let metrics = || http(admin, "GET", "/metrics", "");
    let alive = |m: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix("palisade_tasks_alive ")?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    // The baseline: the watchdog's first sample, before the leak.
    let mut sampled = false;
    for _ in 0..100 {
        if alive(&metrics()) > 0.0 {
            sampled = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(sampled, "the watchdog never sampled");
    let before = alive(&metrics());
    // The leak: 60 keep-alive connections, each served once and then held.
    let held: Vec<BufReader<TcpStream>> = (0..60)
        .map(|_| {
            let mut s = BufReader::new(TcpStream::connect(proxy).unwrap());
            s.get_ref()
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            write!(s.get_mut(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut status = String::new();
            s.read_line(&mut status).unwrap();
            assert!(status.starts_with("HTTP/1.1 200 "), "{status}");
            s
        })
        .collect();
    // Growth counts against the sample a minute old: the alert comes a
    // minute after the baseline, and only then.
    let alert = next("task count growing: possible leak", Duration::from_secs(180));
    let site = alert["site"].as_str().unwrap().to_owned();
    assert!(
        site.starts_with("crates/palisade-proxy/src/server.rs:"),
        "{alert}"
    );
    assert!(alert["grew_by"].as_i64().unwrap() >= 60, "{alert}");
    assert!(
        alert["tasks_a_minute_ago"].as_f64().unwrap() <= before + 5.0,
        "{alert} {before}"
    );
    let m = metrics();
    let series = format!("palisade_task_growth_alerts_total{{site=\"{site}\"}} ");
    let count: Vec<&str> = m.lines().filter_map(|l| l.strip_prefix(&series)).collect();
    assert_eq!(count, ["1"], "{m}");
    drop(held);
}

/// `--redis redis://user:PASSWORD@host` put the Redis password in the
/// daemon's command line, which every local user reads in
/// `/proc/PID/cmdline` (and `ps`); the Kubernetes example did that, so
/// every user on the node had it. `PALISADE_REDIS_URL` gives the URL in
/// the environment, readable only by the daemon's own user.
#[test]
fn the_redis_url_from_the_environment_stays_out_of_the_command_line() {
    if Command::new("redis-server").arg("--version").output().is_err() {
        assert!(std::env::var("CI").is_err(), "redis-server is missing in CI");
        eprintln!("skipped: redis-server is not installed");
        return;
    }
    let password = "redis-password-in-env-0123";
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("palisade-cli-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _redis = Reaped(
        Command::new("redis-server")
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
            .args(["--requirepass", password])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (upstream, _up) = demo_upstream();
    let config = temp_file(
        "redis-env.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"http://{upstream}\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t0ken-0123456789\"\n\
             [cluster]\nredis = \"redis://127.0.0.1:1\"\nsync_interval = \"20ms\"\n\
             key = \"cli-cluster-key-0123456789abcdef-0\"\n"
        ),
    );
    let mut child = palisade()
        .args(["run", "--config"])
        .arg(&config)
        .env(
            "PALISADE_REDIS_URL",
            format!("redis://:{password}@127.0.0.1:{port}"),
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let daemon = Reaped(child);
    let (_, admin, _) = running_addrs(&mut err);
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let mut up = false;
    for _ in 0..250 {
        let status = json_body(&http(admin, "GET", "/api/v1/cluster", ""));
        if status["up"] == true {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(up, "the daemon never reached redis through PALISADE_REDIS_URL");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(password),
        "the password is in the command line"
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A config file holding the admin token, readable by every user (0644, the
/// usual umask's), handed that token to any local user, silently. The
/// daemon now says so at start; a 0600 file, or the token from the
/// environment, draws no warning.
#[test]
fn a_world_readable_config_holding_a_secret_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;
    let (upstream, _up) = demo_upstream();
    let config = temp_file(
        "readable-secret.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"http://{upstream}\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t0ken-0123456789\"\n[syn]\nenabled = false\n"
        ),
    );
    let start_log = |mode: u32, env_token: bool| {
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut cmd = palisade();
        cmd.args(["run", "--config"]).arg(&config).stderr(Stdio::piped());
        if env_token {
            cmd.env("PALISADE_ADMIN_TOKEN", "env-t0ken-0123456789");
        }
        let mut child = cmd.spawn().unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let _daemon = Reaped(child);
        running_addrs(&mut err).2
    };
    let log = start_log(0o644, false);
    assert!(
        log.contains("is readable by every user on this host and holds admin.token"),
        "{log}"
    );
    for (mode, env) in [(0o600, false), (0o644, true)] {
        let log = start_log(mode, env);
        assert!(!log.contains("readable by every user"), "{mode:o} {env}: {log}");
    }
}
