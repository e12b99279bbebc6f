//! The access log a running `palisade` writes: real requests (curl and raw
//! sockets) through the daemon to a real upstream, and the lines read
//! back as a log reader would.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::start;

/// `curl -s` with extra arguments; the status of each URL, in order.
fn curl(args: &[&str], url: &str) -> Vec<u16> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\\n",
            "--max-time",
            "30",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("curl must be installed");
    assert!(out.status.success(), "curl {url} failed: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

/// Sends raw bytes as one HTTP/1.1 request and returns the status line.
fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// The log's lines once it has at least `n` (waiting generously for the
/// writer thread).
fn lines_at_least(path: &Path, n: usize) -> Vec<String> {
    for _ in 0..600 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        assert!(text.is_empty() || text.ends_with('\n'), "a torn line: {text:?}");
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "fewer than {n} lines in {}:\n{}",
        path.display(),
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

/// One combined line, read strictly: every quoted field ends at the first
/// `"` (the log escapes any quote a client sent), fields are separated by
/// single spaces and the line ends after Palisade's `key=value` fields.
#[derive(Debug)]
struct Combined {
    client: String,
    time: String,
    request: String,
    status: u16,
    bytes: String,
    referer: String,
    user_agent: String,
    extra: BTreeMap<String, String>,
}

fn not_combined<T>(line: &str) -> T {
    panic!("not a combined line: {line:?}")
}

fn parse_combined(line: &str) -> Combined {
    let fail = || not_combined(line);
    assert!(
        line.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "raw control or non-ASCII byte in {line:?}"
    );
    let (client, rest) = line.split_once(" - - [").unwrap_or_else(fail);
    let (time, rest) = rest.split_once("] \"").unwrap_or_else(fail);
    let (request, rest) = rest.split_once("\" ").unwrap_or_else(fail);
    let (status, rest) = rest.split_once(' ').unwrap_or_else(fail);
    let (bytes, rest) = rest.split_once(" \"").unwrap_or_else(fail);
    let (referer, rest) = rest.split_once("\" \"").unwrap_or_else(fail);
    let (user_agent, rest) = rest.split_once("\" ").unwrap_or_else(fail);
    let extra = rest
        .split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| not_combined(line));
            (k.to_owned(), v.to_owned())
        })
        .collect::<BTreeMap<_, _>>();
    let keys: Vec<&str> = extra.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["decision", "ja4", "latency_ms", "peer", "upstream_status"],
        "{line:?}"
    );
    // Plain HTTP: no TLS fingerprint.
    assert_eq!(extra["ja4"], "-", "{line:?}");
    extra["latency_ms"]
        .parse::<f64>()
        .unwrap_or_else(|_| not_combined(line));
    Combined {
        client: client.into(),
        time: time.into(),
        request: request.into(),
        status: status.parse().unwrap_or_else(|_| not_combined(line)),
        bytes: bytes.into(),
        referer: referer.into(),
        user_agent: user_agent.into(),
        extra,
    }
}

/// Sum of `palisade_requests_total` over every label set.
fn requests_total(admin: SocketAddr) -> u64 {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30"])
        .arg(format!("http://{admin}/metrics"))
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("palisade_requests_total{"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap() as u64)
        .sum()
}

fn metric(admin: SocketAddr, name: &str) -> f64 {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30"])
        .arg(format!("http://{admin}/metrics"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

const NO_REPUTATION: &str = "[reputation]\nenabled = false\n";

#[test]
fn combined_lines_carry_the_request_answer_and_decision() {
    let dir = common::temp_dir("access-log", "combined");
    let log = dir.join("access.log");
    let d = start(
        &dir,
        &format!(
            "[access_log]\nenabled = true\npath = \"access.log\"\n\
             [rate_limit]\nrate = 3\nburst = 3\n{NO_REPUTATION}"
        ),
    );
    let proxy = d.proxy;
    let got = curl(
        &["-A", "test-agent/1.0", "-e", "https://example.com/from"],
        &format!("http://{proxy}/status/404?q=1"),
    );
    assert_eq!(got, [404]);
    assert_eq!(curl(&["-I"], &format!("http://{proxy}/")), [200]);
    // Over the limit of 3: refused locally, no upstream status.
    let burst = curl(&[], &format!("http://{proxy}/?[1-6]"));
    let refused = burst.iter().filter(|s| **s == 429).count();
    assert!(refused > 0, "{burst:?}");
    let total = 2 + burst.len();
    let lines = lines_at_least(&log, total);
    assert_eq!(lines.len(), total, "{lines:#?}");
    let parsed: Vec<Combined> = lines.iter().map(|l| parse_combined(l)).collect();

    let first = &parsed[0];
    assert_eq!(first.client, "127.0.0.1");
    assert_eq!(first.request, "GET /status/404?q=1 HTTP/1.1");
    assert_eq!(first.status, 404);
    // The demo upstream answers "404\n".
    assert_eq!(first.bytes, "4");
    assert_eq!(first.referer, "https://example.com/from");
    assert_eq!(first.user_agent, "test-agent/1.0");
    assert_eq!(first.extra["peer"], "127.0.0.1");
    assert_eq!(first.extra["decision"], "allowed");
    assert_eq!(first.extra["upstream_status"], "404");
    let month = first.time.split('/').nth(1).unwrap();
    assert!(first.time.ends_with(" +0000") && month.len() == 3, "{first:?}");

    let head = &parsed[1];
    assert_eq!(head.request, "HEAD / HTTP/1.1");
    assert_eq!((head.status, head.bytes.as_str()), (200, "0"));
    assert_eq!(head.referer, "-");

    let refusals: Vec<&Combined> = parsed.iter().filter(|c| c.status == 429).collect();
    assert_eq!(refusals.len(), refused);
    for r in refusals {
        assert_eq!(r.extra["decision"], "rate_limited");
        assert_eq!(r.extra["upstream_status"], "-");
        assert_eq!(r.bytes, "18", "\"Too Many Requests\\n\"");
    }
    // One line per request the metrics counted, and no more.
    assert_eq!(requests_total(d.admin), total as u64);
    assert_eq!(metric(d.admin, "palisade_access_log_dropped_total"), 0.0);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&log).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640);
}

/// A request whose target and headers carry quotes, a backslash, a
/// non-UTF-8 byte and a whole fake log line (the target's line break
/// percent-encoded, as the HTTP parser leaves it).
const HOSTILE: &[u8] = b"GET /a\"b%0A203.0.113.7%20-%20-%20%5B03/Dec/2026:12:00:00%20+0000%5D%20%22GET%20/wp-login.php%20HTTP/1.1%22%20404%201 HTTP/1.1\r\n\
    Host: x\r\nUser-Agent: evil\" 200 5 \"-\" \"x\xff\\\r\nReferer: r\"\r\nConnection: close\r\n\r\n";
/// Control bytes in a header: the HTTP parser refuses it with 400 before
/// any service, so it has no line (and no count in the metrics either).
const CONTROL: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: a\x1b[2Jb\r\nConnection: close\r\n\r\n";
const PLAIN: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// What a client sends in its target and headers stays inside its fields:
/// no quote, backslash or byte it chose can end a field or start a line.
#[test]
fn hostile_fields_cannot_forge_a_line() {
    let dir = common::temp_dir("access-log", "hostile");
    let log = dir.join("access.log");
    let d = start(
        &dir,
        &format!("[access_log]\nenabled = true\npath = \"access.log\"\n{NO_REPUTATION}"),
    );
    let statuses: Vec<String> = [HOSTILE, CONTROL, PLAIN]
        .iter()
        .map(|r| raw_request(d.proxy, r))
        .collect();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 404 Not Found",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 200 OK"
        ]
    );
    assert_eq!(requests_total(d.admin), 2);
    let lines = lines_at_least(&log, 2);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let parsed: Vec<Combined> = lines.iter().map(|l| parse_combined(l)).collect();
    for c in &parsed {
        assert_eq!(c.client, "127.0.0.1");
        assert_eq!(c.extra["peer"], "127.0.0.1");
    }
    let h = &parsed[0];
    assert_eq!(
        h.request,
        "GET /a\\x22b%0A203.0.113.7%20-%20-%20%5B03/Dec/2026:12:00:00%20+0000%5D%20%22GET%20/wp-login.php%20HTTP/1.1%22%20404%201 HTTP/1.1"
    );
    assert_eq!(h.user_agent, "evil\\x22 200 5 \\x22-\\x22 \\x22x\\xFF\\x5C");
    assert_eq!(h.referer, "r\\x22");
    assert_eq!(h.status, 404);
    assert_eq!(parsed[1].request, "GET / HTTP/1.1");
}

#[test]
fn json_lines_parse_and_keep_what_was_sent() {
    let dir = common::temp_dir("access-log", "json");
    let log = dir.join("access.json");
    let d = start(
        &dir,
        &format!(
            "[access_log]\nenabled = true\nformat = \"json\"\npath = \"access.json\"\n\
             [rate_limit]\nrate = 2\nburst = 2\n{NO_REPUTATION}"
        ),
    );
    assert_eq!(raw_request(d.proxy, HOSTILE), "HTTP/1.1 404 Not Found");
    let burst = curl(&["-A", "burst"], &format!("http://{}/delay/1?[1-4]", d.proxy));
    assert!(burst.contains(&429), "{burst:?}");
    let lines = lines_at_least(&log, 5);
    assert_eq!(lines.len(), 5, "{lines:#?}");
    let v: Vec<serde_json::Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let h = &v[0];
    assert_eq!(h["client"], "127.0.0.1");
    assert_eq!(h["peer"], "127.0.0.1");
    assert_eq!(h["method"], "GET");
    assert_eq!(
        h["target"],
        "/a\"b%0A203.0.113.7%20-%20-%20%5B03/Dec/2026:12:00:00%20+0000%5D%20%22GET%20/wp-login.php%20HTTP/1.1%22%20404%201"
    );
    assert_eq!(h["protocol"], "HTTP/1.1");
    assert_eq!(h["status"], 404);
    assert_eq!(h["bytes"], 58);
    // Not UTF-8: each byte as the code point of its value.
    assert_eq!(h["user_agent"], "evil\" 200 5 \"-\" \"x\u{ff}\\");
    assert_eq!(h["referer"], "r\"");
    assert_eq!(h["decision"], "allowed");
    assert_eq!(h["upstream_status"], 404);
    assert!(h["latency_ms"].as_f64().unwrap() >= 0.0);
    let time = h["time"].as_str().unwrap();
    assert!(
        time.len() == 24 && time.ends_with('Z') && &time[10..11] == "T",
        "{time}"
    );
    for (line, status) in v[1..].iter().zip(&burst) {
        assert_eq!(line["status"], *status);
        assert_eq!(line["user_agent"], "burst");
        assert_eq!(line["referer"], serde_json::Value::Null);
        if *status == 429 {
            assert_eq!(line["decision"], "rate_limited");
            assert_eq!(line["upstream_status"], serde_json::Value::Null);
        } else {
            assert_eq!(line["decision"], "allowed");
            assert_eq!(line["upstream_status"], *status);
            // The demo upstream waited 1 ms before its head.
            assert!(line["latency_ms"].as_f64().unwrap() >= 1.0, "{line}");
        }
    }
}

/// logrotate's way: move the file, SIGUSR1, and the daemon writes a new
/// file of the old name while the moved one keeps what it had.
#[test]
fn sigusr1_after_a_move_reopens_a_new_file() {
    let dir = common::temp_dir("access-log", "reopen");
    let log = dir.join("access.log");
    let d = start(
        &dir,
        &format!("[access_log]\nenabled = true\npath = \"access.log\"\n{NO_REPUTATION}"),
    );
    assert_eq!(curl(&[], &format!("http://{}/?before", d.proxy)), [200]);
    lines_at_least(&log, 1);
    let moved = dir.join("access.log.1");
    std::fs::rename(&log, &moved).unwrap();
    let killed = Command::new("kill")
        .args(["-USR1", &d.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for _ in 0..600 {
        if log.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(log.exists(), "no new file after SIGUSR1");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&log).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640);
    assert_eq!(curl(&[], &format!("http://{}/?after", d.proxy)), [200]);
    let new = lines_at_least(&log, 1);
    assert_eq!(new.len(), 1);
    assert!(new[0].contains("GET /?after "), "{new:?}");
    let old = std::fs::read_to_string(&moved).unwrap();
    assert_eq!(old.lines().count(), 1, "{old}");
    assert!(old.contains("GET /?before "), "{old}");
    // Still alive and serving after the signal.
    assert_eq!(requests_total(d.admin), 2);
}

/// A refusal burst: every allowed request has its line; refusals get at
/// most the budget's lines a second, and the rest are counted on a line
/// of their own, so lines and counts add up to what was answered.
#[test]
fn refusals_over_the_budget_are_counted_not_written() {
    let dir = common::temp_dir("access-log", "budget");
    let log = dir.join("access.log");
    let d = start(
        &dir,
        &format!(
            "[access_log]\nenabled = true\npath = \"access.log\"\nrefusal_budget = 3\n\
             [rate_limit]\nrate = 1\nburst = 1\n{NO_REPUTATION}"
        ),
    );
    let burst = curl(&[], &format!("http://{}/?[1-40]", d.proxy));
    let allowed = burst.iter().filter(|s| **s == 200).count();
    let refused = burst.iter().filter(|s| **s == 429).count();
    assert_eq!(allowed + refused, burst.len(), "{burst:?}");
    assert!(allowed >= 1 && refused > 3, "{burst:?}");
    let mut account = (0, 0, 0, Vec::new());
    for _ in 0..600 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let (mut ok, mut limited, mut suppressed) = (0, 0, 0);
        let mut summaries = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('[') {
                let (_, said) = rest.split_once("] palisade: ").unwrap();
                let (total, by) = said
                    .split_once(" refusals not logged (over access_log.refusal_budget): ")
                    .unwrap();
                assert_eq!(by, format!("rate_limited={total}"), "{line}");
                suppressed += total.parse::<usize>().unwrap();
                summaries.push(line.to_owned());
                continue;
            }
            let c = parse_combined(line);
            match c.status {
                200 => ok += 1,
                429 => limited += 1,
                other => panic!("{other} in {line}"),
            }
        }
        account = (ok, limited, suppressed, summaries);
        if limited + suppressed == refused {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, limited, suppressed, summaries) = account;
    assert_eq!(ok, allowed, "every allowed request is written");
    assert_eq!(limited + suppressed, refused, "{summaries:?}");
    assert!(
        (3..refused).contains(&limited),
        "{limited} refusal lines of {refused}"
    );
    assert!(!summaries.is_empty());
    assert_eq!(requests_total(d.admin), burst.len() as u64);
    assert_eq!(metric(d.admin, "palisade_access_log_dropped_total"), 0.0);
}

/// `fail2ban-regex LOG FILTER`: the count of lines the filter matched
/// (and every matched line's host), or `None` when fail2ban is not
/// installed (a failure under CI).
fn fail2ban_matches(log: &Path, filter: &Path) -> Option<usize> {
    let Ok(out) = Command::new("fail2ban-regex")
        .arg("--print-all-matched")
        .arg(log)
        .arg(filter)
        .output()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "fail2ban-regex (Debian package fail2ban) is missing in CI"
        );
        eprintln!("skipped fail2ban-regex: fail2ban is not installed");
        return None;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fail2ban-regex {}: {text}",
        filter.display()
    );
    // "Lines: 12 lines, 0 ignored, 3 matched, 9 missed"
    let summary = text
        .lines()
        .find_map(|l| l.strip_prefix("Lines: "))
        .unwrap_or_else(|| panic!("no summary from fail2ban-regex:\n{text}"));
    let matched = summary
        .split(", ")
        .find_map(|part| part.strip_suffix(" matched"))
        .unwrap()
        .parse()
        .unwrap();
    // The fake line inside a target never matches as a line of its own.
    assert!(!text.contains("203.0.113."), "a forged host matched:\n{text}");
    Some(matched)
}

fn stock_filter(name: &str) -> PathBuf {
    Path::new("/etc/fail2ban/filter.d").join(name)
}

/// fail2ban's own nginx filters, unchanged, read Palisade's combined lines:
/// bot scans of admin paths (404 from the upstream) and the requests
/// Palisade itself answers 400 (ambiguous path or Host, no Host, a
/// Transfer-Encoding it will not forward), which also get their line and
/// their `palisade_requests_total` count. The shipped filter for refusals
/// matches the rate-limited lines.
#[test]
fn fail2ban_stock_nginx_filters_match_palisade_lines() {
    let dir = common::temp_dir("access-log", "fail2ban");
    let log = dir.join("access.log");
    let d = start(
        &dir,
        &format!(
            "[access_log]\nenabled = true\npath = \"access.log\"\n\
             [rate_limit]\nrate = 20\nburst = 20\n{NO_REPUTATION}"
        ),
    );
    let proxy = d.proxy;
    // Scans: the upstream has none of these (404).
    for (flags, path) in [
        (&[][..], "/wp-login.php"),
        (&["-I"][..], "/phpmyadmin/index.php"),
        (&[][..], "/cgi-bin/test.cgi"),
    ] {
        assert_eq!(curl(flags, &format!("http://{proxy}{path}")), [404], "{path}");
    }
    // Not scans: a page, a 404 on an ordinary path, and one whose target
    // carries a fake scan line from another host.
    assert_eq!(curl(&[], &format!("http://{proxy}/")), [200]);
    assert_eq!(curl(&[], &format!("http://{proxy}/status/404")), [404]);
    assert_eq!(raw_request(proxy, HOSTILE), "HTTP/1.1 404 Not Found");
    let bad: [&[u8]; 4] = [
        b"GET /%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    ];
    for r in bad {
        assert_eq!(
            raw_request(proxy, r),
            "HTTP/1.1 400 Bad Request",
            "{}",
            String::from_utf8_lossy(r)
        );
    }
    // Past the limit of 20: some 429s.
    let burst = curl(&[], &format!("http://{proxy}/?[1-30]"));
    let limited = burst.iter().filter(|s| **s == 429).count();
    assert!(limited > 0, "{burst:?}");
    let total = 6 + bad.len() + burst.len();
    let lines = lines_at_least(&log, total);
    assert_eq!(lines.len(), total, "{lines:#?}");
    assert_eq!(requests_total(d.admin), total as u64);
    let parsed: Vec<Combined> = lines.iter().map(|l| parse_combined(l)).collect();
    let bad_lines: Vec<&Combined> = parsed.iter().filter(|c| c.status == 400).collect();
    assert_eq!(bad_lines.len(), bad.len());
    for c in &bad_lines {
        assert_eq!(c.extra["decision"], "bad_request");
        assert_eq!(c.extra["upstream_status"], "-");
        assert_eq!(c.client, "127.0.0.1");
    }
    assert_eq!(bad_lines[0].request, "GET /%zz HTTP/1.1");

    let Some(scans) = fail2ban_matches(&log, &stock_filter("nginx-botsearch.conf")) else {
        return;
    };
    assert_eq!(scans, 3, "the three scans of admin paths");
    let bad_requests = fail2ban_matches(&log, &stock_filter("nginx-bad-request.conf")).unwrap();
    assert_eq!(bad_requests, bad.len());
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/fail2ban/palisade-refused.conf");
    let refused = fail2ban_matches(&log, &shipped).unwrap();
    assert_eq!(refused, limited);
}

/// A disk that stops taking lines (here a FIFO nobody reads) never holds
/// up a request: the writer's queue fills, every request is still
/// answered, the lines that found no room are counted, and once the
/// reader comes back the lines written and the lines dropped add up to
/// the requests.
#[test]
fn a_stalled_log_drops_and_counts_lines_and_never_stalls_requests() {
    let dir = common::temp_dir("access-log", "stalled");
    let fifo = dir.join("access.log");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // Read-write: a reader exists (the daemon's open does not wait), but
    // nothing is read until the burst is over.
    let pipe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let d = start(
        &dir,
        "[access_log]\nenabled = true\npath = \"access.log\"\n\
         [rate_limit]\nenabled = false\n[reputation]\nenabled = false\n",
    );
    // More than the queue (8 192 lines) and the pipe (64 KiB) hold.
    let n = 10_000;
    let statuses = curl(&[], &format!("http://{}/?[1-{n}]", d.proxy));
    assert_eq!(statuses.len(), n);
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(requests_total(d.admin), n as u64);
    let dropped = metric(d.admin, "palisade_access_log_dropped_total") as usize;
    assert!(dropped > 0, "nothing dropped: the queue never filled");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut written = 0;
    while written + dropped < n {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{written} lines written, {dropped} dropped, of {n}"));
        let c = parse_combined(&line);
        assert_eq!(c.status, 200);
        written += 1;
    }
    assert_eq!(written + dropped, n);
    assert_eq!(
        metric(d.admin, "palisade_access_log_dropped_total") as usize,
        dropped
    );
}
