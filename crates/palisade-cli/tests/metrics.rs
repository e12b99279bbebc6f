//! The metrics a running `palisade` exports, scraped with curl as
//! Prometheus would, parsed, and checked with `promtool check metrics`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
use common::{log_addr, running_line};

const TOKEN: &str = "metrics-test-token-0123";

/// Kills the daemon if a test fails before it would have.
struct Daemon {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    metrics: Option<SocketAddr>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-metrics-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// Starts `palisade run --config FILE` and waits for its "palisade running"
/// line; the rest of its log is drained in the background.
fn start(config: &Path) -> Daemon {
    let child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Owned by the guard at once, so a failed wait below kills it too.
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut d = Daemon {
        child,
        proxy: unknown,
        admin: unknown,
        metrics: None,
    };
    let line = running_line(&mut d.child);
    // A daemon on 0.0.0.0 is reached on loopback.
    let local = |a: SocketAddr| SocketAddr::from(([127, 0, 0, 1], a.port()));
    d.proxy = local(log_addr(&line, "proxy").unwrap());
    d.admin = local(log_addr(&line, "admin").unwrap());
    d.metrics = log_addr(&line, "metrics").map(local);
    d
}

/// `curl -s -i` with extra arguments: (status, headers lowercased, body).
fn curl(args: &[&str], url: String) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "30"])
        .args(args)
        .arg(&url)
        .output()
        .expect("curl must be installed");
    assert!(out.status.success(), "curl {url} failed: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// One parsed exposition: families by name with their type and help, and
/// every sample as `name{labels}` → value.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    helps: BTreeMap<String, String>,
    samples: BTreeMap<String, f64>,
}

impl Exposition {
    /// Parses the Prometheus text format (0.0.4) strictly: every sample
    /// belongs to a family declared before it, with a number for a value.
    fn parse(text: &str) -> Self {
        let mut e = Self::default();
        let mut current = String::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                e.helps.insert(name.into(), help.into());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    e.types.insert(name.into(), kind.into()).is_none(),
                    "{name} declared twice"
                );
                current = name.into();
            } else {
                assert!(!line.starts_with('#'), "unexpected comment {line:?}");
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                let family_ok = name == current
                    || (e.types[&current] == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(current.as_str())));
                assert!(family_ok, "sample {series} outside its family {current}");
                let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line:?}: not a number"));
                assert!(e.samples.insert(series.into(), v).is_none(), "{series} twice");
            }
        }
        e
    }

    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series}"))
    }
}

fn promtool_check(text: &str) {
    use std::io::Write as _;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool (Debian package prometheus) is missing in CI"
        );
        eprintln!("skipped promtool check metrics: promtool is not installed");
        return;
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `/proc/PID/stat` utime + stime in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = String::from_utf8(Command::new("getconf").arg("CLK_TCK").output().unwrap().stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / ticks
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[allow(clippy::disallowed_methods)] // compared with the daemon's wall-clock timestamps
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Waits (generously) for a condition on the daemon.
fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..600 {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn the_metrics_listener_serves_the_metrics_without_token_and_nothing_else() {
    // A non-loopback admin listener: there every read needs the token, so
    // a Prometheus without it is refused (the reason for the second listener).
    let config = temp_file(
        "listener.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"http://127.0.0.1:9\"]\n[syn]\nenabled = false\n[admin]\nlisten = \"0.0.0.0:0\"\nmetrics_listen = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\nmax_connections = 4\nheader_read_timeout = \"120s\"\n"
        ),
    );
    let d = start(&config);
    let metrics = d.metrics.expect("the running line names the metrics listener");
    let (status, _, _) = curl(&[], format!("http://{}/metrics", d.admin));
    assert_eq!(status, 401, "the admin listener wants the token for reads");

    let (status, head, body) = curl(&[], format!("http://{metrics}/metrics"));
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
    let e = Exposition::parse(&body);
    assert!(e.types.len() > 40, "only {} families", e.types.len());
    promtool_check(&body);

    // Prometheus asks for OpenMetrics and gets it.
    let (status, head, body) = curl(
        &[
            "-H",
            "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        ],
        format!("http://{metrics}/metrics"),
    );
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");

    // Nothing else, not even with the token, not even the probes.
    for (method, path) in [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/"),
        ("GET", "/api/v1/bans"),
        ("GET", "/api/v1/reputation/127.0.0.1"),
        ("GET", "/syn-stats"),
        ("POST", "/api/v1/reload"),
        ("POST", "/metrics"),
        ("DELETE", "/metrics"),
    ] {
        let (status, _, _) = curl(
            &["-X", method, "-H", &format!("Authorization: Bearer {TOKEN}")],
            format!("http://{metrics}{path}"),
        );
        assert_eq!(status, 404, "{method} {path}");
    }
    // HEAD is a read.
    let (status, _, _) = curl(&["-I"], format!("http://{metrics}/metrics"));
    assert_eq!(status, 200);
    // A name that is not in admin.allowed_hosts (DNS rebinding) is refused.
    let (status, _, _) = curl(
        &["-H", "Host: attacker.example"],
        format!("http://{metrics}/metrics"),
    );
    assert_eq!(status, 421);

    // The admin listener's cap holds here too, counted apart: five silent
    // connections on the metrics listener (the fifth already past the cap
    // of four), then a scrape. It is served, the oldest silent ones are
    // closed to make room (holders of idle connections cannot lock
    // scrapers out), and the admin API answers.
    let mut idle: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(metrics).unwrap()).collect();
    let (status, _, _) = curl(&[], format!("http://{metrics}/metrics"));
    assert_eq!(status, 200);
    for s in &idle {
        s.set_nonblocking(true).unwrap();
    }
    wait_for("a silent connection closed to make room", || {
        idle.iter_mut().any(|s| matches!(s.read(&mut [0u8; 1]), Ok(0)))
    });
    let (status, _, _) = curl(&[], format!("http://{}/healthz", d.admin));
    assert_eq!(status, 200);
    drop(idle);
    wait_for("a place on the metrics listener again", || {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "5"])
            .arg(format!("http://{metrics}/metrics"))
            .status()
            .is_ok_and(|s| s.success())
    });
}

#[test]
fn counters_are_counters_and_the_process_reports_itself() {
    let before = unix_now();
    let config = temp_file(
        "exposition.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"http://127.0.0.1:9\"]\n[syn]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"
        ),
    );
    let d = start(&config);
    let after_start = unix_now();
    let pid = d.child.id();
    let metrics = d.metrics.unwrap();
    let scrape = || Exposition::parse(&curl(&[], format!("http://{metrics}/metrics")).2);
    let e = scrape();

    // What the SYN defense, the kernel and the XDP program count since
    // start are counters; the exporter computes no rates.
    for family in [
        "palisade_syn_seen_total",
        "palisade_syn_bans_installed_total",
        "palisade_xdp_packets_total",
        "palisade_kernel_tcp_total",
        "palisade_decisions_total",
        "process_cpu_seconds_total",
    ] {
        assert_eq!(
            e.types.get(family).map(String::as_str),
            Some("counter"),
            "{family}"
        );
    }
    for gone in [
        "palisade_syn_per_second",
        "palisade_kernel_tcp_per_second",
        "palisade_syn_seen",
    ] {
        assert!(!e.types.contains_key(gone), "{gone} is still exported");
    }
    for (name, kind) in &e.types {
        assert!(e.helps.contains_key(name), "{name} has no help");
        if name.ends_with("_total") {
            assert_eq!(kind, "counter", "{name}");
        }
    }

    // The build, as `--version` tells it.
    let version = String::from_utf8(
        Command::new(env!("CARGO_BIN_EXE_palisade"))
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let xdp = if version.contains("XDP: compiled in") {
        "true"
    } else {
        "false"
    };
    assert_eq!(
        e.get(&format!(
            "palisade_build_info{{version=\"{}\",xdp=\"{xdp}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0,
        "{version}"
    );

    // Process metrics agree with what /proc says of the daemon from outside.
    let start_time = e.get("process_start_time_seconds");
    // btime is whole seconds: the start time is known to a second.
    assert!(
        start_time > before - 1.5 && start_time < after_start + 1.5,
        "{before} <= {start_time} <= {after_start}"
    );
    let loaded = e.get("palisade_last_reload_success_timestamp_seconds");
    assert!(
        loaded >= before && loaded <= after_start,
        "{before} <= {loaded} <= {after_start}"
    );
    let cpu_before = cpu_seconds(pid);
    let cpu = scrape().get("process_cpu_seconds_total");
    let cpu_after = cpu_seconds(pid);
    assert!(
        cpu >= cpu_before && cpu <= cpu_after,
        "{cpu_before} <= {cpu} <= {cpu_after}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vm_rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    let rss = scrape().get("process_resident_memory_bytes");
    assert!(
        rss > vm_rss_kb * 1024.0 / 2.0 && rss < vm_rss_kb * 1024.0 * 2.0,
        "{rss} vs VmRSS {vm_rss_kb} kB"
    );
    assert!(scrape().get("process_max_fds") >= 1.0);

    // Thirty connections held open to the proxy are thirty more descriptors.
    let fds_before = scrape().get("process_open_fds");
    let held: Vec<TcpStream> = (0..30).map(|_| TcpStream::connect(d.proxy).unwrap()).collect();
    let base = open_fds(pid);
    wait_for("the daemon to accept thirty connections", || {
        scrape().get("palisade_connections_open") >= 30.0
    });
    let fds = scrape().get("process_open_fds");
    assert!(fds >= fds_before + 30.0, "{fds_before} -> {fds}");
    // The scrape's own connection may or may not be counted in either.
    let outside = open_fds(pid) as f64;
    assert!(
        (fds - outside).abs() <= 2.0,
        "scraped {fds}, /proc/{pid}/fd has {outside} (was {base})"
    );
    drop(held);

    // A reload that applies moves the timestamp; one that fails does not.
    let reload = || {
        curl(
            &["-X", "POST", "-H", &format!("Authorization: Bearer {TOKEN}")],
            format!("http://{}/api/v1/reload", d.admin),
        )
        .0
    };
    let before_reload = unix_now();
    assert_eq!(reload(), 200);
    let e = scrape();
    let reloaded = e.get("palisade_last_reload_success_timestamp_seconds");
    assert!(
        reloaded >= before_reload && reloaded > loaded,
        "{loaded} -> {reloaded}"
    );
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}\n[rate_limit]\nburst = 0\n")).unwrap();
    assert_eq!(reload(), 422);
    let e = scrape();
    assert_eq!(e.get("palisade_last_reload_success_timestamp_seconds"), reloaded);
    assert_eq!(e.get("palisade_config_last_reload_success"), 0.0);
    // The file watcher may have tried the broken file too.
    assert!(e.get("palisade_config_reloads_total{kind=\"error\"}") >= 1.0);
}

#[test]
fn the_metrics_listener_closes_a_request_head_that_never_ends() {
    use std::io::Write as _;
    // admin.header_read_timeout holds on the metrics listener: a head that
    // never completes is closed, where the hour-long idle timeout would not.
    let config = temp_file(
        "deadline.toml",
        "[server]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"http://127.0.0.1:9\"]\n[syn]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\nheader_read_timeout = \"1s\"\nidle_timeout = \"1h\"\n",
    );
    let d = start(&config);
    let mut s = TcpStream::connect(d.metrics.unwrap()).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
    // Generous: the point is that it closes at all.
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    let answer = String::from_utf8_lossy(&rest);
    assert!(!answer.contains("200 OK"), "{answer}");
}
