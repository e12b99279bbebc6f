//! The admin ban API against the real daemon (dry-run firewall: the bans
//! are enforced at accept, the host's kernel is left alone). A ban is a
//! weapon; these are the ways it could be turned on the daemon itself.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Harness, metric};
use http::StatusCode;

async fn post_ban(h: &Harness, body: &str) -> (StatusCode, String) {
    h.admin_request("POST", "/api/v1/bans", body).await
}

#[tokio::test]
async fn admin_bans_that_would_cut_off_the_host_or_the_world_are_400() {
    let h = Harness::start("", "[syn]\nfirewall = \"dry-run\"\nxdp = \"off\"\n").await;
    for (body, why) in [
        (r#"{"ip": "0.0.0.0/0"}"#, "wider than /16"),
        (r#"{"ip": "::/0"}"#, "wider than /32"),
        (r#"{"ip": "10.0.0.0/8"}"#, "wider than /16"),
        (r#"{"ip": "127.0.0.1"}"#, "loopback"),
        (r#"{"ip": "::1"}"#, "loopback"),
        (r#"{"ip": "::ffff:127.0.0.1"}"#, "loopback"),
        (
            r#"{"ip": "198.51.100.7", "duration": "18446744073709551615s"}"#,
            "too long",
        ),
        (r#"{"ip": "198.51.100.7", "duration": "25h"}"#, "max_ban_duration"),
    ] {
        let (status, text) = post_ban(&h, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
        assert!(text.contains(why), "{body}: {text}");
    }
    let (status, _, bans) = h.admin_client().await.get("/api/v1/bans").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bans.trim(), "[]", "{bans}");
    // The daemon still serves its loopback clients.
    let (status, _, _) = h.client("127.0.0.2").await.get("/").await;
    assert_eq!(status, StatusCode::OK);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_bans_refused_total{reason=\"too_wide\"}"),
        3.0
    );
    assert_eq!(
        metric(&m, "palisade_bans_refused_total{reason=\"loopback\"}"),
        3.0
    );
    assert_eq!(
        metric(&m, "palisade_bans_refused_total{reason=\"too_long\"}"),
        1.0
    );
    // An ordinary ban is still taken.
    let (status, text) = post_ban(&h, r#"{"ip": "198.51.100.0/24", "duration": "1h"}"#).await;
    assert_eq!(status, StatusCode::OK, "{text}");
}

#[tokio::test]
async fn a_cidr_ban_holds_at_accept_without_a_kernel_firewall() {
    // Loopback bans are the only ones a loopback test can observe.
    let h = Harness::start(
        "",
        "[syn]\nfirewall = \"dry-run\"\nxdp = \"off\"\nnever_ban_loopback = false\n",
    )
    .await;
    let (status, _, _) = h.client("127.0.9.5").await.get("/").await;
    assert_eq!(status, StatusCode::OK);
    let (status, text) = post_ban(&h, r#"{"ip": "127.0.9.0/24", "duration": "5m"}"#).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // A fresh connection from inside the /24 is closed before a byte is read.
    if let Err(answer) = common::refused_at_accept("127.0.9.5", h.proxy()).await {
        panic!("a client inside the banned /24 was served: {answer}");
    }
    // Outside it, served.
    let (status, _, _) = h.client("127.0.10.5").await.get("/").await;
    assert_eq!(status, StatusCode::OK);
}

/// An IPv4-mapped IPv6 ban (`::ffff:a.b.c.d`, as dual-stack logs print
/// clients) is the IPv4 ban it names: it holds against that client, and the
/// IPv4 minimum prefix applies (`::ffff:64.0.0.0/99` is `64.0.0.0/3`).
#[tokio::test]
async fn an_ipv4_mapped_ban_is_its_ipv4_ban() {
    let h = Harness::start(
        "",
        "[syn]\nfirewall = \"dry-run\"\nxdp = \"off\"\nnever_ban_loopback = false\n",
    )
    .await;
    let (status, text) = post_ban(&h, r#"{"ip": "::ffff:64.0.0.0/99"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("wider than /16"), "{text}");
    let (status, text) = post_ban(&h, r#"{"ip": "::ffff:127.0.11.0/120", "duration": "5m"}"#).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    if let Err(answer) = common::refused_at_accept("127.0.11.5", h.proxy()).await {
        panic!("a client inside the banned ::ffff:127.0.11.0/120 was served: {answer}");
    }
    let (status, _, _) = h.client("127.0.12.5").await.get("/").await;
    assert_eq!(status, StatusCode::OK);
    // Lifted by either spelling.
    let (status, text) = h
        .admin_request("DELETE", "/api/v1/bans/127.0.11.0%2F24", "")
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
}
