//! Request smuggling against the real daemon: raw bytes from a TCP client,
//! and an upstream that records every request exactly as it arrives. Each
//! ambiguous message is refused (400) or answered once with the connection
//! closed; no second request hidden in it ever reaches the upstream, and
//! the upstream never sees `Transfer-Encoding` beside `Content-Length` or a
//! body other than the one the daemon read.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Harness, connect_from};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// One request as the upstream read it off the wire.
#[derive(Debug, Clone)]
struct Seen {
    /// Which upstream connection it came on (in accept order).
    conn: usize,
    /// The request line.
    line: String,
    /// Every `Transfer-Encoding` value, in order.
    te: Vec<String>,
    /// Every `Content-Length` value, in order.
    cl: Vec<String>,
    /// Trailer lines of a chunked body.
    trailers: Vec<String>,
    /// The body, framing removed.
    body: Vec<u8>,
    /// Whether the whole message arrived before the connection ended.
    complete: bool,
}

/// An upstream that parses HTTP/1.1 by the RFC, strictly, records each
/// request and answers `200 upstream`.
struct Recorder {
    addr: SocketAddr,
    log: Arc<Log>,
}

#[derive(Default)]
struct Log {
    seen: Mutex<Vec<Seen>>,
    /// Connections whose reading has ended, by accept order.
    ended: Mutex<Vec<usize>>,
    /// Request heads read whole, bodies read or not.
    heads: Mutex<usize>,
    changed: tokio::sync::Notify,
}

impl Recorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Arc<Log> = Arc::default();
        let shared = log.clone();
        tokio::spawn(async move {
            let mut next = 0;
            while let Ok((s, _)) = listener.accept().await {
                let log = shared.clone();
                let conn = next;
                next += 1;
                tokio::spawn(async move {
                    record(conn, Wire { s, buf: Vec::new() }, &log).await;
                    log.ended.lock().unwrap().push(conn);
                    log.changed.notify_waiters();
                });
            }
        });
        Self { addr, log }
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.seen.lock().unwrap().clone()
    }

    /// Waits until `n` request heads have been read whole.
    async fn wait_heads(&self, n: usize) {
        let arrived = async {
            loop {
                let changed = self.log.changed.notified();
                if *self.log.heads.lock().unwrap() >= n {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), arrived)
            .await
            .expect("the request head never reached the upstream");
    }

    fn heads(&self) -> usize {
        *self.log.heads.lock().unwrap()
    }

    /// Waits until every connection accepted before `conn` has been read to
    /// its end (the daemon keeps none idle: `pool_max_idle = 0`).
    async fn wait_ended_before(&self, conn: usize) {
        let all_ended = async {
            loop {
                let changed = self.log.changed.notified();
                let ended = self.log.ended.lock().unwrap().clone();
                if (0..conn).all(|c| ended.contains(&c)) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), all_ended)
            .await
            .expect("an upstream connection stayed open 10 s after its request");
    }
}

/// A connection's bytes with what was read but not yet consumed.
struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.s.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// One CRLF-terminated line (without it); None at end of stream.
    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }
}

async fn record(conn: usize, mut w: Wire, log: &Log) {
    loop {
        let Some(line) = w.line().await else { return };
        let mut seen = Seen {
            conn,
            line,
            te: Vec::new(),
            cl: Vec::new(),
            trailers: Vec::new(),
            body: Vec::new(),
            complete: false,
        };
        let complete = read_rest(&mut w, &mut seen, log).await;
        seen.complete = complete;
        let both = !seen.te.is_empty() && !seen.cl.is_empty();
        log.seen.lock().unwrap().push(seen);
        log.changed.notify_waiters();
        // A message this upstream could not frame ends the connection: it
        // must not guess where the next one starts.
        if !complete || both {
            return;
        }
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nupstream\n";
        if w.s.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// Reads the headers and body of `seen`; whether all of it arrived.
async fn read_rest(w: &mut Wire, seen: &mut Seen, log: &Log) -> bool {
    loop {
        let Some(h) = w.line().await else { return false };
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            return false;
        };
        let value = value.trim().to_owned();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            seen.te.push(value);
        } else if name.eq_ignore_ascii_case("content-length") {
            seen.cl.push(value);
        }
    }
    *log.heads.lock().unwrap() += 1;
    log.changed.notify_waiters();
    if !seen.te.is_empty() {
        if seen.te != ["chunked"] {
            return false;
        }
        loop {
            let Some(size) = w.line().await else { return false };
            let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or(""), 16) else {
                return false;
            };
            if n == 0 {
                break;
            }
            let Some(data) = w.exact(n + 2).await else {
                return false;
            };
            if !data.ends_with(b"\r\n") {
                return false;
            }
            seen.body.extend_from_slice(&data[..n]);
        }
        loop {
            let Some(t) = w.line().await else { return false };
            if t.is_empty() {
                return true;
            }
            seen.trailers.push(t);
        }
    }
    match seen.cl.as_slice() {
        [] => true,
        [n] => match n.parse::<usize>() {
            Ok(n) => match w.exact(n).await {
                Some(body) => {
                    seen.body = body;
                    true
                }
                None => false,
            },
            Err(_) => false,
        },
        _ => false,
    }
}

/// One response the client read.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

/// Writes `bytes` on a fresh connection and reads until the daemon closes
/// it (a reset after data counts as closed); every response in order.
async fn exchange(source: &str, proxy: SocketAddr, bytes: &[u8]) -> Vec<Answer> {
    try_exchange(source, proxy, bytes)
        .await
        .expect("the daemon kept the connection open 10 s")
}

/// Like [`exchange`]; None when the daemon keeps the connection open.
async fn try_exchange(source: &str, proxy: SocketAddr, bytes: &[u8]) -> Option<Vec<Answer>> {
    let mut s = connect_from(source, proxy).await;
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.ok()?;
    Some(parse_answers(&buf))
}

fn parse_answers(mut rest: &[u8]) -> Vec<Answer> {
    let mut out = Vec::new();
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a response: {head}"));
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.trim().parse().unwrap());
        let body_end = (end + 4 + len).min(rest.len());
        let body = String::from_utf8_lossy(&rest[end + 4..body_end]).into_owned();
        out.push(Answer { status, body });
        rest = &rest[body_end..];
    }
    assert!(rest.is_empty(), "bytes after the last response: {rest:?}");
    out
}

/// What the daemon must do with one message.
enum Expect {
    /// One 400, nothing complete reaches the upstream.
    Refused,
    /// One response, then the connection closes; the upstream saw that one
    /// request, with this body.
    OnceThenClosed(&'static [u8]),
}

/// The would-be smuggled request; it must never reach the upstream.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: test.local\r\n\r\n";

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
}

/// `head` (request line and headers, without the blank line), then `body`
/// with each `{len}` in `head` replaced by the body's length.
fn case(name: &'static str, head: &str, body: &str, expect: Expect) -> Case {
    let head = head.replace("{len}", &body.len().to_string());
    Case {
        name,
        bytes: format!("{head}\r\n{body}").into_bytes(),
        expect,
    }
}

/// The daemon in front of `upstream`, keeping no idle upstream connection
/// so each forward's connection ends with it.
async fn daemon(upstream: &Recorder) -> Harness {
    Harness::start_with_upstream(
        &format!("http://{}", upstream.addr),
        "",
        "[upstream]\npool_max_idle = 0\n",
        upstream.addr,
    )
    .await
}

/// Runs every case on its own connection against one daemon and checks
/// what the client got and what the upstream saw.
async fn run(cases: Vec<Case>) {
    let upstream = Recorder::start().await;
    let h = daemon(&upstream).await;
    let mut failures = Vec::new();
    for (i, c) in cases.into_iter().enumerate() {
        let before = upstream.seen().len();
        // Each case from its own address: the refusals before it must not
        // count against it (parse failures feed the adaptive breaker).
        let source = format!("127.0.1.{}", i + 2);
        let Some(answers) = try_exchange(&source, h.proxy(), &c.bytes).await else {
            failures.push(format!("{}: the connection stayed open 10 s", c.name));
            continue;
        };
        let seen = settle(&h, &upstream, before).await;
        if let Err(why) = check(&c, &answers, &seen) {
            failures.push(format!(
                "{}: {why}\n  sent: {:?}\n  answers: {answers:?}\n  upstream saw: {seen:?}",
                c.name,
                String::from_utf8_lossy(&c.bytes)
            ));
        }
    }
    h.running.shutdown().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The upstream's log since `before`, once the upstream has read to its
/// end everything the daemon sent for the case: a last request through
/// the daemon comes on a connection accepted after every earlier one, and
/// each earlier one ends because the daemon pools none.
async fn settle(h: &Harness, upstream: &Recorder, before: usize) -> Vec<Seen> {
    let answers = exchange(
        "127.0.0.1",
        h.proxy(),
        b"GET /settle HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].status, 200, "{answers:?}");
    let seen = upstream.seen();
    let settle = seen
        .iter()
        .rfind(|s| s.line.starts_with("GET /settle "))
        .unwrap()
        .conn;
    upstream.wait_ended_before(settle).await;
    upstream.seen()[before..]
        .iter()
        .filter(|s| s.conn != settle)
        .cloned()
        .collect()
}

fn check(c: &Case, answers: &[Answer], seen: &[Seen]) -> Result<(), String> {
    for s in seen {
        if s.line.contains("/smuggled") {
            return Err("the smuggled request reached the upstream".into());
        }
        if !s.te.is_empty() && !s.cl.is_empty() {
            return Err("the upstream saw Transfer-Encoding and Content-Length together".into());
        }
        if s.cl.len() > 1 || (!s.te.is_empty() && s.te != ["chunked"]) {
            return Err("the upstream saw a framing other than one length or chunked".into());
        }
    }
    let complete: Vec<&Seen> = seen.iter().filter(|s| s.complete).collect();
    match c.expect {
        Expect::Refused => {
            if answers.len() != 1 || answers[0].status != 400 {
                return Err("expected one 400".into());
            }
            if !complete.is_empty() {
                return Err("a refused request reached the upstream whole".into());
            }
        }
        Expect::OnceThenClosed(body) => {
            if answers.len() != 1 {
                return Err("expected one response, then the connection closed".into());
            }
            if complete.len() != 1 || complete[0].body != body {
                return Err(format!(
                    "expected the upstream to see one request with body {:?}",
                    String::from_utf8_lossy(body)
                ));
            }
            if answers[0].body != "upstream\n" {
                return Err("the answer is not the upstream's".into());
            }
        }
    }
    Ok(())
}

/// `Content-Length` beside `Transfer-Encoding` (either order, any spelling
/// of `chunked` the daemon reads as chunked): chunked wins, `Content-Length`
/// is never forwarded, and the connection closes after the one answer, so
/// what an upstream reading the length would take for a body is never read
/// as a request.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_answered_once_then_closed() {
    let chunked = format!("0\r\n\r\n{SMUGGLED}");
    let mut cases = Vec::new();
    for (name, te) in [
        (
            "CL then TE",
            "Content-Length: {len}\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "TE then CL",
            "Transfer-Encoding: chunked\r\nContent-Length: {len}\r\n",
        ),
        (
            "TE `Chunked`",
            "Content-Length: {len}\r\nTransfer-Encoding: Chunked\r\n",
        ),
        (
            "TE `chunked `",
            "Content-Length: {len}\r\nTransfer-Encoding: chunked \r\n",
        ),
        (
            "TE `\\tchunked`",
            "Content-Length: {len}\r\nTransfer-Encoding:\tchunked\r\n",
        ),
        (
            "CL 0 then TE",
            "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
        ),
    ] {
        cases.push(case(
            name,
            &format!("POST /a HTTP/1.1\r\nHost: test.local\r\n{te}"),
            &chunked,
            Expect::OnceThenClosed(b""),
        ));
    }
    // The length hides the smuggled request inside a chunk: the daemon
    // reads it as the body it is.
    let body = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    cases.push(case(
        "TE with a chunk a short CL would split",
        "POST /a HTTP/1.1\r\nHost: test.local\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        &body,
        Expect::OnceThenClosed(SMUGGLED.as_bytes()),
    ));
    run(cases).await;
}

/// Two lengths that disagree, or a list of them on one line, are 400
/// (RFC 9112 §6.3).
#[tokio::test]
async fn two_content_lengths_that_disagree_are_400() {
    let body = format!("abcde{SMUGGLED}");
    let mut cases = Vec::new();
    for (name, cl) in [
        ("5 then 0", "Content-Length: 5\r\nContent-Length: 0\r\n"),
        ("0 then 5", "Content-Length: 0\r\nContent-Length: 5\r\n"),
        ("5 then {len}", "Content-Length: 5\r\nContent-Length: {len}\r\n"),
        ("5, 5 on one line", "Content-Length: 5, 5\r\n"),
        ("5, 0 on one line", "Content-Length: 5, 0\r\n"),
        ("+5", "Content-Length: +5\r\n"),
        ("-1", "Content-Length: -1\r\n"),
        ("0x5", "Content-Length: 0x5\r\n"),
        ("overflow", "Content-Length: 99999999999999999999\r\n"),
        ("empty", "Content-Length: \r\n"),
    ] {
        cases.push(case(
            name,
            &format!("POST /a HTTP/1.1\r\nHost: test.local\r\n{cl}"),
            &body,
            Expect::Refused,
        ));
    }
    run(cases).await;
}

/// `Transfer-Encoding` that is not exactly `chunked`: a coding the daemon
/// cannot undo before forwarding (`identity, chunked`, `gzip, chunked`),
/// `chunked` not last, or `chunked` twice. With or without a length: 400.
#[tokio::test]
async fn a_transfer_encoding_other_than_chunked_alone_is_400() {
    let body = format!("0\r\n\r\n{SMUGGLED}");
    let mut cases = Vec::new();
    for (name, te) in [
        ("chunked, identity", "Transfer-Encoding: chunked, identity\r\n"),
        ("identity, chunked", "Transfer-Encoding: identity, chunked\r\n"),
        ("gzip, chunked", "Transfer-Encoding: gzip, chunked\r\n"),
        ("chunked, chunked", "Transfer-Encoding: chunked, chunked\r\n"),
        (
            "two lines, chunked last",
            "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "two lines, chunked first",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        ),
        (
            "two chunked lines",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ),
        ("xchunked", "Transfer-Encoding: xchunked\r\n"),
        ("chunked;q=1", "Transfer-Encoding: chunked;q=1\r\n"),
        ("empty", "Transfer-Encoding: \r\n"),
    ] {
        cases.push(case(
            name,
            &format!("POST /a HTTP/1.1\r\nHost: test.local\r\n{te}"),
            &body,
            Expect::Refused,
        ));
        cases.push(case(
            name,
            &format!("POST /a HTTP/1.1\r\nHost: test.local\r\nContent-Length: {{len}}\r\n{te}"),
            &body,
            Expect::Refused,
        ));
    }
    run(cases).await;
}

/// Header lines an RFC 9112 parser must refuse and a lenient one reads
/// differently: folded continuation lines (§5.2), whitespace between the
/// name and the colon (§5.1), bare CR or LF line ends.
#[tokio::test]
async fn folded_or_spaced_header_lines_are_400() {
    let body = format!("0\r\n\r\n{SMUGGLED}");
    let mut cases = Vec::new();
    for (name, headers) in [
        (
            "obs-fold TE",
            "Content-Length: {len}\r\nTransfer-Encoding:\r\n chunked\r\n",
        ),
        (
            "obs-fold TE tab",
            "Content-Length: {len}\r\nTransfer-Encoding:\r\n\tchunked\r\n",
        ),
        (
            "obs-fold after TE",
            "Transfer-Encoding: chunked\r\n , identity\r\n",
        ),
        ("obs-fold CL", "Content-Length:\r\n {len}\r\n"),
        ("obs-fold X", "X-A: 1\r\n Transfer-Encoding: chunked\r\n"),
        ("Host space colon", "Host : evil.example\r\n"),
        (
            "TE space colon",
            "Content-Length: {len}\r\nTransfer-Encoding : chunked\r\n",
        ),
        (
            "TE tab colon",
            "Content-Length: {len}\r\nTransfer-Encoding\t: chunked\r\n",
        ),
        ("CL space colon", "Content-Length : {len}\r\n"),
        (
            "TE newline colon",
            "Content-Length: {len}\r\nTransfer-Encoding\r\n: chunked\r\n",
        ),
        (
            "bare CR in TE",
            "Content-Length: {len}\r\nTransfer-Encoding: chunked\rX: y\r\n",
        ),
        (
            "bare CR in name",
            "Content-Length: {len}\r\nX\rTransfer-Encoding: chunked\r\n",
        ),
        (
            "NUL in TE",
            "Content-Length: {len}\r\nTransfer-Encoding: chun\0ked\r\n",
        ),
    ] {
        cases.push(case(
            name,
            &format!("POST /a HTTP/1.1\r\nHost: test.local\r\n{headers}"),
            &body,
            Expect::Refused,
        ));
    }
    run(cases).await;
}

/// Chunk framing that strict and lenient parsers split differently:
/// overflowing or signed sizes, a `0x` prefix, extensions hiding line
/// ends, data not followed by CRLF, LF-only or bare-CR line ends. The
/// daemon refuses the request; the upstream, which may already have the
/// head, never gets a whole request from it.
#[tokio::test]
async fn bad_chunk_framing_is_400_and_never_completes_upstream() {
    let mut cases = Vec::new();
    for (name, body) in [
        (
            "overflowing size",
            format!("ffffffffffffffff1\r\nx\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "size past u64",
            format!("10000000000000000\r\nx\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        ("negative size", format!("-1\r\nx\r\n0\r\n\r\n{SMUGGLED}")),
        ("0x prefix", format!("0x10\r\n{SMUGGLED}\r\n0\r\n\r\n")),
        ("plus sign", format!("+5\r\nabcde\r\n0\r\n\r\n{SMUGGLED}")),
        ("empty size", format!("\r\nabcde\r\n0\r\n\r\n{SMUGGLED}")),
        (
            "LF in extension",
            format!("5;a\nb\r\nabcde\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "bare CR in extension",
            format!("5;a\rb\r\nabcde\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "extension over the limit",
            format!("5;{}\r\nabcde\r\n0\r\n\r\n", "a".repeat(70_000)),
        ),
        ("data without CRLF", format!("5\r\nabcdeX\r\n0\r\n\r\n{SMUGGLED}")),
        ("data with LF only", format!("5\r\nabcde\n0\r\n\r\n{SMUGGLED}")),
        ("LF-only lines", format!("5\nabcde\n0\n\n{SMUGGLED}")),
        ("bare CR after size", format!("5\rabcde\r\n0\r\n\r\n{SMUGGLED}")),
        (
            "size shorter than data",
            format!("3\r\nabcde\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        ("bare CR ends the last chunk", format!("0\r\r\n{SMUGGLED}")),
    ] {
        cases.push(Case {
            name,
            bytes: format!(
                "POST /a HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
            )
            .into_bytes(),
            expect: Expect::Refused,
        });
    }
    run(cases).await;
}

/// Sends each `(name, head, body)` followed by a last request on the same
/// connection: both are answered 200, and the upstream sees exactly those
/// two requests, the first with `SMUGGLED` as its body, framed one way.
async fn served_with_smuggled_as_body(cases: &[(&str, String, String)]) {
    let upstream = Recorder::start().await;
    let h = daemon(&upstream).await;
    let last = "GET /last HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n";
    for (name, head, body) in cases {
        let before = upstream.seen().len();
        let answers = exchange("127.0.0.2", h.proxy(), format!("{head}{body}{last}").as_bytes()).await;
        let seen = settle(&h, &upstream, before).await;
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        assert_eq!(statuses, [200, 200], "{name}: {answers:?}");
        let lines: Vec<&str> = seen.iter().map(|s| s.line.as_str()).collect();
        let method = head.split(' ').next().unwrap();
        assert_eq!(
            lines,
            [format!("{method} /a HTTP/1.1").as_str(), "GET /last HTTP/1.1"],
            "{name}: {seen:?}"
        );
        assert_eq!(seen[0].body, SMUGGLED.as_bytes(), "{name}: {seen:?}");
        for s in &seen {
            assert!(s.complete, "{name}: {seen:?}");
            assert!(s.te.is_empty() || s.cl.is_empty(), "{name}: {seen:?}");
            assert!(s.cl.len() <= 1, "{name}: {seen:?}");
            // Framing headers in trailers are for no one to act on.
            assert!(
                s.trailers.iter().all(|t| {
                    let t = t.to_ascii_lowercase();
                    !t.starts_with("content-length") && !t.starts_with("transfer-encoding")
                }),
                "{name}: {seen:?}"
            );
        }
    }
    h.running.shutdown().await;
}

/// `SMUGGLED` as one chunk.
fn one_chunk() -> String {
    format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len())
}

/// A body on `GET` is read by its framing and forwarded as that body; the
/// request inside it never becomes a request of its own, and the request
/// after it is served as the next one. A chunked `GET` body was dropped
/// (hyper's client sends a `GET` body of unknown length as none).
#[tokio::test]
async fn a_body_on_get_is_forwarded_as_its_body_never_as_a_request() {
    served_with_smuggled_as_body(&[
        (
            "length",
            format!(
                "GET /a HTTP/1.1\r\nHost: test.local\r\nContent-Length: {}\r\n\r\n",
                SMUGGLED.len()
            ),
            SMUGGLED.to_owned(),
        ),
        (
            "chunked",
            "GET /a HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
            one_chunk(),
        ),
    ])
    .await;
}

/// The same length twice is one length (RFC 9112 §6.3 lets a recipient
/// read it so, and every reader that accepts it agrees); `chunked` in any
/// case or surrounded by whitespace is chunked. Each is read and forwarded
/// as that framing, with one `Content-Length` or chunked, and framing
/// headers smuggled in as trailers never reach the upstream.
#[tokio::test]
async fn one_length_twice_or_chunked_spelled_oddly_is_read_as_that_framing() {
    let len = SMUGGLED.len();
    served_with_smuggled_as_body(&[
        (
            "same length twice",
            format!(
                "POST /a HTTP/1.1\r\nHost: test.local\r\nContent-Length: {len}\r\nContent-Length: {len}\r\n\r\n"
            ),
            SMUGGLED.to_owned(),
        ),
        (
            "Chunked",
            "POST /a HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: Chunked\r\n\r\n".to_owned(),
            one_chunk(),
        ),
        (
            "chunked and a space",
            "POST /a HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked \r\n\r\n".to_owned(),
            one_chunk(),
        ),
        (
            "tab and chunked",
            "POST /a HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding:\tchunked\r\n\r\n".to_owned(),
            one_chunk(),
        ),
        (
            "framing in trailers",
            "POST /a HTTP/1.1\r\nHost: test.local\r\nTrailer: Content-Length, Transfer-Encoding\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_owned(),
            format!(
                "{:x}\r\n{SMUGGLED}\r\n0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                SMUGGLED.len()
            ),
        ),
    ])
    .await;
}

/// HTTP/1.0 has no chunked coding (RFC 9112 §6.1): a 1.0 request naming
/// one is 400, with or without a length beside it.
#[tokio::test]
async fn http10_with_transfer_encoding_is_400() {
    let body = format!("0\r\n\r\n{SMUGGLED}");
    run(vec![
        case(
            "1.0 TE",
            "POST /a HTTP/1.0\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n",
            &body,
            Expect::Refused,
        ),
        case(
            "1.0 TE and CL",
            "POST /a HTTP/1.0\r\nHost: test.local\r\nContent-Length: {len}\r\nTransfer-Encoding: chunked\r\n",
            &body,
            Expect::Refused,
        ),
    ])
    .await;
}

/// How the daemon ended one HTTP/2 stream.
#[derive(Debug, PartialEq)]
enum H2End {
    /// A response head; its `:status` when HPACK-encoded as a static-table
    /// index (how hyper writes 200 and 400), else 0.
    Status(u16),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection closed first.
    Closed,
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header block of literal fields without indexing or Huffman coding,
/// so any name and value can be sent, as a polite encoder would refuse to.
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0);
        for s in [name, value] {
            out.push(u8::try_from(s.len()).unwrap());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PROTOCOL_ERROR: u32 = 0x1;

/// Opens stream 1 with `fields` and then `data` as DATA frames (the last
/// one with END_STREAM; none: the HEADERS frame ends the stream), all in
/// one write; how the daemon ended the stream.
async fn h2_stream(source: &str, proxy: SocketAddr, fields: &[(&str, &str)], data: &[&[u8]]) -> H2End {
    let mut out = h2_open(fields, data.is_empty());
    for (i, d) in data.iter().enumerate() {
        let last = i + 1 == data.len();
        out.extend(frame(0x0, if last { END_STREAM } else { 0 }, 1, d));
    }
    let mut s = connect_from(source, proxy).await;
    s.write_all(&out).await.unwrap();
    h2_end(&mut s).await
}

/// The preface, our SETTINGS and a HEADERS frame opening stream 1.
fn h2_open(fields: &[(&str, &str)], end_stream: bool) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    let flags = if end_stream {
        END_HEADERS | END_STREAM
    } else {
        END_HEADERS
    };
    out.extend(frame(0x1, flags, 1, &hpack(fields)));
    out
}

/// Reads frames (acknowledging the daemon's SETTINGS) until stream 1 ends.
async fn h2_end(s: &mut TcpStream) -> H2End {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while buf.len() >= 9 {
                let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                let payload: Vec<u8> = buf[9..9 + len].to_vec();
                buf.drain(..9 + len);
                let code = |at: usize| u32::from_be_bytes(payload[at..at + 4].try_into().unwrap());
                match (kind, stream) {
                    (0x4, 0) if flags & 0x1 == 0 => {
                        let _ = s.write_all(&frame(0x4, 0x1, 0, &[])).await;
                    }
                    (0x1, 1) => {
                        let status = match payload.first() {
                            Some(b @ 0x88..=0x8e) => {
                                [200, 204, 206, 304, 400, 404, 500][usize::from(b - 0x88)]
                            }
                            _ => 0,
                        };
                        return H2End::Status(status);
                    }
                    (0x3, 1) => return H2End::Reset(code(0)),
                    (0x7, 0) => return H2End::GoAway(code(4)),
                    _ => {}
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return H2End::Closed,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the daemon neither answered nor ended the stream in 10 s")
}

/// A name, the header fields and the DATA frames of one HTTP/2 stream.
type H2Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<&'a [u8]>);

/// HTTP/2 requests RFC 9113 calls malformed: a `content-length` the DATA
/// does not add up to (§8.1.1), connection-specific fields and `te` other
/// than `trailers` (§8.2.2). Each stream is reset with PROTOCOL_ERROR
/// before the daemon answers, and no whole request reaches the upstream.
/// A well-formed stream on the same raw client is served, so the client is
/// not what refuses the others.
#[tokio::test]
async fn malformed_http2_requests_are_reset_and_never_complete_upstream() {
    let upstream = Recorder::start().await;
    let h = daemon(&upstream).await;
    let post = |extra: &[(&'static str, &'static str)]| {
        let mut f = vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "test.local"),
            (":path", "/a"),
        ];
        f.extend_from_slice(extra);
        f
    };
    let smuggled_chunks = format!("0\r\n\r\n{SMUGGLED}");
    let chunks: &[u8] = smuggled_chunks.as_bytes();
    let refused: Vec<H2Case> = vec![
        (
            "content-length over the DATA",
            post(&[("content-length", "10")]),
            vec![b"abcde"],
        ),
        (
            "content-length under the DATA",
            post(&[("content-length", "5")]),
            vec![b"abcdefghij"],
        ),
        (
            "content-length passed by a second DATA",
            post(&[("content-length", "5")]),
            vec![b"abcde", b"fghij"],
        ),
        (
            "content-length short at an empty last DATA",
            post(&[("content-length", "10")]),
            vec![b"abcde", b""],
        ),
        (
            "content-length 0 with DATA",
            post(&[("content-length", "0")]),
            vec![b"abcde"],
        ),
        (
            "content-length with no DATA",
            post(&[("content-length", "5")]),
            vec![],
        ),
        (
            "transfer-encoding chunked",
            post(&[("transfer-encoding", "chunked")]),
            vec![chunks],
        ),
        (
            "transfer-encoding and content-length",
            post(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
            vec![chunks],
        ),
        (
            "connection",
            post(&[("connection", "keep-alive")]),
            vec![b"abcde"],
        ),
        ("keep-alive", post(&[("keep-alive", "timeout=5")]), vec![b"abcde"]),
        (
            "proxy-connection",
            post(&[("proxy-connection", "keep-alive")]),
            vec![b"abcde"],
        ),
        ("upgrade", post(&[("upgrade", "h2c")]), vec![b"abcde"]),
        ("te gzip", post(&[("te", "gzip")]), vec![b"abcde"]),
    ];
    let mut failures = Vec::new();
    for (i, (name, fields, data)) in refused.iter().enumerate() {
        let before = upstream.seen().len();
        let source = format!("127.0.2.{}", i + 2);
        let end = h2_stream(&source, h.proxy(), fields, data).await;
        let seen = settle(&h, &upstream, before).await;
        let whole: Vec<&Seen> = seen.iter().filter(|s| s.complete).collect();
        if !matches!(end, H2End::Reset(PROTOCOL_ERROR) | H2End::GoAway(PROTOCOL_ERROR)) || !whole.is_empty() {
            failures.push(format!(
                "{name}: the daemon ended it {end:?}; the upstream saw {seen:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for (name, fields, data) in [
        (
            "matching content-length",
            post(&[("content-length", "5"), ("te", "trailers")]),
            vec![&b"abcde"[..]],
        ),
        ("no content-length", post(&[]), vec![&b"abc"[..], &b"de"[..]]),
    ] {
        let before = upstream.seen().len();
        let end = h2_stream("127.0.2.200", h.proxy(), &fields, &data).await;
        assert_eq!(end, H2End::Status(200), "{name}");
        let seen = settle(&h, &upstream, before).await;
        assert_eq!(seen.len(), 1, "{name}: {seen:?}");
        assert_eq!(seen[0].body, b"abcde", "{name}: {seen:?}");
        assert!(seen[0].te.is_empty() || seen[0].cl.is_empty(), "{name}: {seen:?}");
    }
    h.running.shutdown().await;
}

/// A body that breaks after part of it was forwarded: the daemon has sent
/// the upstream the head (and may have sent the start of the body) when
/// the rest turns out wrong. The client gets a refusal and the upstream
/// connection ends without a whole request, never a request padded or cut
/// to look whole.
#[tokio::test]
async fn a_body_that_breaks_after_forwarding_began_never_completes_upstream() {
    let upstream = Recorder::start().await;
    let h = daemon(&upstream).await;
    let head = "POST /a HTTP/1.1\r\nHost: test.local\r\n";
    for (i, (name, first, then)) in [
        (
            "bad chunk after a good one",
            format!("{head}Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n"),
            format!("zz\r\n{SMUGGLED}"),
        ),
        (
            "chunk data without CRLF",
            format!("{head}Transfer-Encoding: chunked\r\n\r\n5\r\nabc"),
            format!("deX0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "length cut by the client's close",
            format!("{head}Content-Length: 10\r\n\r\nabcde"),
            String::new(),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let before = upstream.seen().len();
        let heads = upstream.heads();
        let mut s = connect_from(&format!("127.0.3.{}", i + 2), h.proxy()).await;
        s.write_all(first.as_bytes()).await.unwrap();
        upstream.wait_heads(heads + 1).await;
        if then.is_empty() {
            s.shutdown().await.unwrap();
        } else {
            s.write_all(then.as_bytes()).await.unwrap();
        }
        let mut buf = Vec::new();
        let read = async {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut chunk).await {
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the daemon kept the connection open 10 s");
        let answers = parse_answers(&buf);
        let seen = settle(&h, &upstream, before).await;
        // A client that closed mid-body may get no answer at all.
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        assert!(
            statuses == [400] || (then.is_empty() && statuses.is_empty()),
            "{name}: {answers:?}"
        );
        assert_eq!(seen.len(), 1, "{name}: {seen:?}");
        assert!(!seen[0].complete, "{name}: {seen:?}");
    }

    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "test.local"),
        (":path", "/a"),
        ("content-length", "10"),
    ];
    for (name, first, then) in [
        (
            "h2 content-length passed by a later DATA",
            &b"abcde"[..],
            &b"fghijk"[..],
        ),
        (
            "h2 content-length short at END_STREAM",
            &b"abcde"[..],
            &b"fgh"[..],
        ),
    ] {
        let before = upstream.seen().len();
        let heads = upstream.heads();
        let mut s = connect_from("127.0.3.100", h.proxy()).await;
        let mut out = h2_open(&fields, false);
        out.extend(frame(0x0, 0, 1, first));
        s.write_all(&out).await.unwrap();
        upstream.wait_heads(heads + 1).await;
        s.write_all(&frame(0x0, END_STREAM, 1, then)).await.unwrap();
        let end = h2_end(&mut s).await;
        let seen = settle(&h, &upstream, before).await;
        assert_eq!(end, H2End::Reset(PROTOCOL_ERROR), "{name}: {seen:?}");
        assert_eq!(seen.len(), 1, "{name}: {seen:?}");
        assert!(!seen[0].complete, "{name}: {seen:?}");
    }
    h.running.shutdown().await;
}
