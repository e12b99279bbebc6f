//! The admin listener attacked as an outside client would: held open with a
//! partial head or silence, flooded with connections, read through a
//! rebound DNS name, and brute-forced for its token. Real daemon, real
//! sockets, raw bytes.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Harness, connect_from, raw_exchange};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "test-token-0123456789";

/// Status code of the first response in `text`, 0 when there is none.
fn status(text: &str) -> u16 {
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// One request on its own connection from `source`; the raw response.
async fn admin_request(h: &Harness, source: &str, head: &str) -> String {
    raw_exchange(
        source,
        h.admin(),
        format!("{head}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// Reads until the server closes (bounded: a server that never closes fails).
async fn closed_by_server(mut s: tokio::net::TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the admin listener never closed the connection")
        .unwrap_or_default();
    buf
}

/// Before: a partial head, or a connection that never spoke, stayed open on
/// the admin port for as long as the client liked.
#[tokio::test]
async fn partial_heads_and_silent_connections_are_closed_at_the_deadlines() {
    let h = Harness::start("", "header_read_timeout = \"300ms\"\nidle_timeout = \"300ms\"\n").await;
    let mut partial = connect_from("127.0.0.1", h.admin()).await;
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    assert!(closed_by_server(partial).await.is_empty());
    let silent = connect_from("127.0.0.1", h.admin()).await;
    assert!(closed_by_server(silent).await.is_empty());
    // A keep-alive connection is answered, then closed once idle.
    let mut idle = connect_from("127.0.0.1", h.admin()).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let answered = String::from_utf8(closed_by_server(idle).await).unwrap();
    assert_eq!(status(&answered), 200, "{answered}");
}

/// A connection in the middle of a request: an authenticated PUT whose
/// body never comes. Returned once the server asked for the body (its
/// `100 Continue`), so the request is surely in flight.
async fn busy_admin_connection(h: &Harness) -> tokio::net::TcpStream {
    let mut s = connect_from("127.0.0.1", h.admin()).await;
    s.write_all(
        format!(
            "PUT /api/v1/reputation/198.18.0.7 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the body was never asked for")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100 "),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s
}

/// Before: every connection was served, so idle admin connections could
/// take the file descriptors the proxy needs. When every connection is in
/// the middle of a request, one more is closed before it is read.
#[tokio::test]
async fn connections_past_the_cap_are_closed_unanswered() {
    let h = Harness::start("", "max_connections = 2\nheader_read_timeout = \"60s\"\n").await;
    let held = [busy_admin_connection(&h).await, busy_admin_connection(&h).await];
    let mut third = connect_from("127.0.0.1", h.admin()).await;
    // Written before the server can have closed it: the bytes are ignored.
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    assert_eq!(String::from_utf8(closed_by_server(third).await).unwrap(), "");
    drop(held);
    // The slots come back when the held connections end.
    let mut served = false;
    for _ in 0..100 {
        let text = admin_request(&h, "127.0.0.1", "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n").await;
        if status(&text) == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the admin listener never took connections again");
}

/// Before: one address that held every admin connection open, asking for
/// `/healthz` (no token needed) more often than `idle_timeout`, locked the
/// operator out for as long as it liked. Past the cap, the oldest
/// connection with no request in flight now gives way to the new one, as
/// nginx reuses idle keep-alive connections.
#[tokio::test]
async fn keep_alive_holders_cannot_lock_the_operator_out() {
    let h = Harness::start("", "max_connections = 2\nidle_timeout = \"60s\"\n").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.50", h.admin()).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(status(&String::from_utf8_lossy(&buf[..n])), 200);
        held.push(s);
    }
    let text = admin_request(&h, "127.0.0.1", "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n").await;
    assert_eq!(status(&text), 200, "the operator was locked out: {text:?}");
    // The oldest holder was the one closed.
    let first = held.remove(0);
    assert!(closed_by_server(first).await.is_empty());
}

/// Before: any `Host` read the admin API, so a page whose DNS name was
/// rebound to 127.0.0.1 could read bans, scores and metrics.
#[tokio::test]
async fn a_host_that_is_not_this_listener_is_refused() {
    let h = Harness::start("", "").await;
    let port = h.admin().port();
    for (host, expected) in [
        ("evil.example".to_string(), 421),
        (format!("evil.example:{port}"), 421),
        (format!("127.0.0.1:{port}"), 200),
        ("127.0.0.1".to_string(), 200),
        (format!("localhost:{port}"), 200),
        ("LOCALHOST".to_string(), 200),
        ("[::1]".to_string(), 200),
        // Named in the harness's admin.allowed_hosts.
        ("test.local".to_string(), 200),
    ] {
        let text = admin_request(
            &h,
            "127.0.0.1",
            &format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\n"),
        )
        .await;
        assert_eq!(status(&text), expected, "Host: {host}\n{text}");
    }
    let text = admin_request(&h, "127.0.0.1", "GET /metrics HTTP/1.0\r\n").await;
    assert_eq!(status(&text), 421, "no Host\n{text}");
    let text = admin_request(
        &h,
        "127.0.0.1",
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n",
    )
    .await;
    assert_eq!(status(&text), 421, "two Hosts\n{text}");
}

fn put_score(token_header: &str) -> String {
    let body = "{\"score\": 50}";
    format!(
        "PUT /api/v1/reputation/198.18.0.7 HTTP/1.1\r\nHost: 127.0.0.1\r\n{token_header}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn send_put(h: &Harness, source: &str, token_header: &str) -> String {
    raw_exchange(
        source,
        h.admin(),
        put_score(&format!("{token_header}Connection: close\r\n")).as_bytes(),
    )
    .await
}

/// Before: `bearer` and `BEARER` were 401 (RFC 9110: the scheme is case-insensitive).
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let h = Harness::start("", "").await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let text = send_put(&h, "127.0.0.1", &format!("Authorization: {scheme} {TOKEN}\r\n")).await;
        assert_eq!(status(&text), 200, "{scheme}\n{text}");
    }
}

/// Before: an address could guess tokens as fast as the listener answered.
#[tokio::test]
async fn failed_token_checks_throttle_the_address() {
    let h = Harness::start("", "max_auth_failures = 3\n").await;
    for guess in ["a", "b", "c"] {
        let text = send_put(
            &h,
            "127.0.0.1",
            &format!("Authorization: Bearer guess-{guess}\r\n"),
        )
        .await;
        assert_eq!(status(&text), 401, "{text}");
    }
    // Throttled now, right token or not: a guesser learns nothing more.
    let text = send_put(&h, "127.0.0.1", &format!("Authorization: Bearer {TOKEN}\r\n")).await;
    assert_eq!(status(&text), 429, "{text}");
    let retry: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .expect("no Retry-After")
        .trim()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Another address is not held back by it; on loopback, the user is
    // the one held back, whatever address of 127/8 it uses.
    let text = send_put(&h, "127.0.0.2", &format!("Authorization: Bearer {TOKEN}\r\n")).await;
    assert_eq!(status(&text), 429, "{text}");
}

/// Every local user connects from 127.0.0.1, and failed token checks were
/// counted per address: any unprivileged user on the host could send ten
/// wrong tokens a minute and keep the operator's `palisade bans` (also
/// from 127.0.0.1) at 429 for as long as it liked. On loopback they count
/// per user now (the socket's owner, from `sock_diag`).
#[tokio::test]
async fn a_local_user_guessing_tokens_does_not_lock_the_operator_out() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        assert!(std::env::var("CI").is_err(), "CI runs this test as root");
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let h = Harness::start("", "max_auth_failures = 3\n").await;
    let url = format!(
        "http://127.0.0.1:{}/api/v1/reputation/198.18.0.7",
        h.admin().port()
    );
    let curl = |token: &str| {
        let url = url.clone();
        let header = format!("Authorization: Bearer {token}");
        async move {
            // Off the runtime's thread, which must go on serving it.
            tokio::task::spawn_blocking(move || {
                use std::os::unix::process::CommandExt as _;
                let out = std::process::Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
                    .args(["-H", &header, "-H", "Content-Type: application/json"])
                    .args(["--data", "{\"score\": 50}", "--interface", "127.0.0.1", &url])
                    .uid(65534)
                    .output()
                    .expect("curl is needed");
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .await
            .unwrap()
        }
    };
    for guess in ["a", "b", "c"] {
        assert_eq!(curl(&format!("guess-{guess}")).await, "401");
    }
    // The guesser is throttled, right token or not...
    assert_eq!(curl(TOKEN).await, "429");
    // ...and the operator, another user on the same address, is not.
    let text = send_put(&h, "127.0.0.1", &format!("Authorization: Bearer {TOKEN}\r\n")).await;
    assert_eq!(status(&text), 200, "{text}");
}
