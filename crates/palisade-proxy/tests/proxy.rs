//! The daemon over real sockets: a real HTTP client, the real proxy and the
//! demo upstream on loopback, several loopback source addresses.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Harness, connect_from, get_requests, metric, raw_exchange};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// On paused time no token refills during the burst, so exactly the burst
/// passes, however long the host takes to run the loop.
#[tokio::test(start_paused = true)]
async fn exactly_100_of_150_rapid_requests_pass_and_the_rest_get_429() {
    let h = Harness::start("", "").await;
    let mut c = h.client("127.0.0.2").await;
    let mut ok = 0u32;
    let mut limited = Vec::new();
    for _ in 0..150 {
        let (status, headers, body) = c.get("/").await;
        match status {
            StatusCode::OK => {
                assert_eq!(body, "ok\n");
                // By default only refusals say what is left of the limit.
                assert!(!headers.contains_key("ratelimit"), "{headers:?}");
                assert!(!headers.contains_key("ratelimit-policy"), "{headers:?}");
                ok += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => limited.push(headers),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 100);
    assert_eq!(ok as usize + limited.len(), 150);
    let h429 = &limited[0];
    let retry: u64 = h429["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry), "retry-after {retry}");
    assert_eq!(h429["ratelimit-policy"], "\"default\";q=100;w=1");
    assert!(
        h429["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"default\";r=0;t=")
    );

    // Another client is untouched.
    let mut other = h.client("127.0.0.3").await;
    assert_eq!(other.get("/").await.0, StatusCode::OK);

    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_decisions_total{decision=\"rate_limited\"}"),
        limited.len() as f64
    );
    assert_eq!(get_requests(&m, "default", 429), limited.len() as f64);
    assert!(m.contains(
        "palisade_request_duration_seconds_bucket{endpoint=\"default\",method=\"GET\",le=\"0.0005\"}"
    ));
    assert_eq!(
        metric(&m, "palisade_tracked_clients{table=\"limiter:default\"}"),
        2.0
    );
    h.running.shutdown().await;
}

/// The client tables' gauges and counters, scraped from the daemon: tables
/// of 16 records fill with distinct clients behind a trusted proxy, the
/// next clients share overflow records, and once the first ones are idle
/// their records go to newcomers. On paused time: the idle periods pass by
/// `advance` (the daemon's clock is tokio's), not by sleeping.
#[tokio::test(start_paused = true)]
async fn client_tables_report_tracked_overflowed_and_taken_over_clients() {
    let h = Harness::start(
        "",
        "[clients]\ntrusted_proxies = [\"127.0.0.1/32\"]\nmax_tracked = 16\n",
    )
    .await;
    let mut c = h.client("127.0.0.1").await;
    for i in 0..40 {
        let xff = format!("198.51.100.{i}");
        assert_eq!(
            c.get_with("/", &[("x-forwarded-for", &xff)]).await.0,
            StatusCode::OK
        );
    }
    let tables = ["limiter:default", "reputation", "adaptive_breaker"];
    let series = |name: &str, table: &str| format!("palisade_{name}{{table=\"{table}\"}}");
    let m = h.metrics().await;
    for table in tables {
        assert_eq!(metric(&m, &series("tracked_clients", table)), 16.0, "{table}");
        let overflows = metric(&m, &series("client_table_overflows_total", table));
        assert!(overflows >= 24.0, "{table}: {overflows} overflows");
        assert_eq!(metric(&m, &series("client_table_takeovers_total", table)), 0.0);
    }
    // A newcomer now and then until every table has handed an idle
    // client's record over (the adaptive breaker's window empties last,
    // 10 to 20 s after a client's last outcome).
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut i = 0u32;
    loop {
        i += 1;
        let xff = format!("203.0.113.{}", i % 250);
        assert_eq!(
            c.get_with("/", &[("x-forwarded-for", &xff)]).await.0,
            StatusCode::OK
        );
        let m = h.metrics().await;
        let taken: Vec<f64> = tables
            .iter()
            .map(|t| metric(&m, &series("client_table_takeovers_total", t)))
            .collect();
        if taken.iter().all(|&n| n > 0.0) {
            for t in tables {
                assert_eq!(metric(&m, &series("tracked_clients", t)), 16.0, "{t}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "takeovers so far: {taken:?}");
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    h.running.shutdown().await;
}

#[tokio::test]
async fn spoofed_forwarded_for_from_untrusted_peer_changes_nothing() {
    let h = Harness::start(
        "",
        "[clients]\ntrusted_proxies = [\"127.0.0.1/32\"]\n[rate_limit]\nrate = 5\n",
    )
    .await;
    let mut c = h.client("127.0.0.4").await;
    let mut ok = 0;
    for i in 0..20 {
        let fake = format!("203.0.113.{i}");
        if c.get_with("/", &[("x-forwarded-for", &fake)]).await.0 == StatusCode::OK {
            ok += 1;
        }
    }
    assert!(
        (5..=6).contains(&ok),
        "rotating a spoofed XFF bought {ok} requests"
    );
    // The spoofed addresses were never tracked as clients.
    let mut admin = h.admin_client().await;
    let (_, _, body) = admin.get("/api/v1/reputation/203.0.113.1").await;
    assert!(body.contains("\"score\":70.0"), "{body}");

    // From the trusted proxy, the right-most untrusted address is the client,
    // and the upstream sees the chain with our hop appended.
    let mut trusted = h.client("127.0.0.1").await;
    let (status, _, body) = trusted
        .get_with("/headers", &[("x-forwarded-for", "6.6.6.6, 198.51.100.7")])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("x-forwarded-for: 6.6.6.6, 198.51.100.7, 127.0.0.1\n"),
        "{body}"
    );
    assert!(
        body.contains("forwarded: for=127.0.0.1;proto=http;host=\"test.local\"\n"),
        "{body}"
    );
    let (_, _, body) = admin.get("/api/v1/reputation/198.51.100.7").await;
    assert!(body.contains("\"ip\":\"198.51.100.7\""), "{body}");
    h.running.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let h = Harness::start("", "").await;
    let mut c = h.client("127.0.0.2").await;
    let (_, _, body) = c
        .get_with(
            "/headers",
            &[
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "secret"),
                ("x-end", "kept"),
                ("te", "trailers"),
            ],
        )
        .await;
    assert!(body.contains("x-end: kept\n"), "{body}");
    assert!(!body.contains("x-hop"), "{body}");
    assert!(!body.contains("\nte:"), "{body}");
    assert!(body.contains("host: test.local\n"), "{body}");
    h.running.shutdown().await;
}

#[tokio::test]
async fn three_401_responses_cost_ten_points() {
    let h = Harness::start("", "").await;
    let mut c = h.client("127.0.0.5").await;
    for _ in 0..3 {
        assert_eq!(c.get("/status/401").await.0, StatusCode::UNAUTHORIZED);
    }
    let mut admin = h.admin_client().await;
    let (status, _, body) = admin.get("/api/v1/reputation/127.0.0.5").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let score = v["score"].as_f64().unwrap();
    assert!((60.0..60.1).contains(&score), "{body}");
    assert_eq!(v["events"][0]["kind"], "error_streak");
    assert_eq!(v["events"][0]["delta"], -10);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_reputation_penalties_total{kind=\"error_streak\"}"),
        1.0
    );
    h.running.shutdown().await;
}

#[tokio::test]
async fn a_flooding_client_ends_in_403_access_denied() {
    // One flooded second costs 45 points: 70 → 25, under the block line.
    let h = Harness::start(
        "",
        "[rate_limit]\nrate = 10\n[reputation]\nflood_threshold = 20\nflood_penalty = 45\n",
    )
    .await;
    let mut c = h.client("127.0.0.6").await;
    // 60 requests: however they straddle a second boundary, one second
    // holds more than the threshold of 20.
    let mut statuses = Vec::new();
    for _ in 0..60 {
        statuses.push(c.get("/").await.0);
    }
    // Throttled first, then refused outright once the flood was scored.
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS));
    let (status, _, body) = c.get("/").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "Access denied");
    // A well-behaved neighbour is still served.
    assert_eq!(h.client("127.0.0.7").await.get("/").await.0, StatusCode::OK);
    let m = h.metrics().await;
    assert!(metric(&m, "palisade_decisions_total{decision=\"reputation_blocked\"}") >= 1.0);
    // One flooded second, or two if the burst straddled a second boundary.
    let floods = metric(&m, "palisade_reputation_penalties_total{kind=\"flood\"}");
    assert!((1.0..=2.0).contains(&floods), "{floods}");
    h.running.shutdown().await;
}

#[tokio::test]
async fn shadow_mode_counts_would_block_but_serves() {
    let h = Harness::start("", "[rate_limit]\nrate = 5\nmode = \"shadow\"\n").await;
    let mut c = h.client("127.0.0.8").await;
    for _ in 0..20 {
        assert_eq!(c.get("/").await.0, StatusCode::OK);
    }
    let m = h.metrics().await;
    let would = metric(&m, "palisade_would_block_total{kind=\"rate_limited\"}");
    assert!((14.0..=15.0).contains(&would), "would_block = {would}");
    assert_eq!(metric(&m, "palisade_decisions_total{decision=\"allowed\"}"), 20.0);
    h.running.shutdown().await;
}

#[tokio::test]
async fn per_route_policy_applies_to_its_route_only() {
    let h = Harness::start(
        "",
        "[[routes]]\nname = \"status\"\npath_prefix = \"/status\"\nrate = 3\n",
    )
    .await;
    let mut c = h.client("127.0.0.9").await;
    let mut ok = 0;
    for _ in 0..10 {
        if c.get("/status/204").await.0 == StatusCode::NO_CONTENT {
            ok += 1;
        }
    }
    assert_eq!(ok, 3);
    assert_eq!(c.get("/").await.0, StatusCode::OK);
    let m = h.metrics().await;
    assert_eq!(get_requests(&m, "status", 429), 7.0);
    h.running.shutdown().await;
}

/// A login route (the demo's `/status`) at 5 a minute: the sixth attempt is refused with the
/// bucket's 12 s in `Retry-After` (not the 1 s window's next second) and a
/// policy of 5 per 60 s; after 12 s of paused time one more passes, and
/// only one.
#[tokio::test(start_paused = true)]
async fn a_login_route_at_five_a_minute_refuses_the_sixth_for_twelve_seconds() {
    let h = Harness::start(
        "",
        "[[routes]]\nname = \"login\"\npath_prefix = \"/status\"\nrate = \"5/m\"\n",
    )
    .await;
    let mut c = h.client("127.0.0.12").await;
    for i in 0..5 {
        assert_eq!(c.get("/status/200").await.0, StatusCode::OK, "attempt {i}");
    }
    let (status, headers, _) = c.get("/status/200").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "12");
    assert_eq!(headers["ratelimit-policy"], "\"login\";q=5;w=60");
    assert_eq!(headers["ratelimit"], "\"login\";r=0;t=12");
    // The rest of the site keeps the default per-second limit.
    assert_eq!(c.get("/").await.0, StatusCode::OK);
    tokio::time::advance(Duration::from_secs(6)).await;
    let mut c = h.client("127.0.0.12").await;
    let (status, headers, _) = c.get("/status/200").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "6");
    tokio::time::advance(Duration::from_secs(6)).await;
    let mut c = h.client("127.0.0.12").await;
    assert_eq!(c.get("/status/200").await.0, StatusCode::OK);
    assert_eq!(c.get("/status/200").await.0, StatusCode::TOO_MANY_REQUESTS);
    let m = h.metrics().await;
    assert_eq!(get_requests(&m, "login", 429), 3.0);
    h.running.shutdown().await;
}

/// `headers = "always"`: every allowed answer says what is left, `r=`
/// counting down request by request to 0, `t=` the seconds until the bucket
/// is full again (12 s a request at 5 a minute); then the refusal. A route
/// may turn it on alone: the default route's answers stay bare.
#[tokio::test(start_paused = true)]
async fn with_headers_always_every_answer_counts_down_to_the_refusal() {
    let h = Harness::start(
        "",
        "[[routes]]\nname = \"login\"\npath_prefix = \"/status\"\nrate = \"5/m\"\nheaders = \"always\"\n",
    )
    .await;
    let mut c = h.client("127.0.0.16").await;
    for left in (0..5).rev() {
        let (status, headers, _) = c.get("/status/200").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["ratelimit-policy"], "\"login\";q=5;w=60");
        let t = 12 * (5 - left);
        assert_eq!(headers["ratelimit"], format!("\"login\";r={left};t={t}").as_str());
    }
    let (status, headers, _) = c.get("/status/200").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["ratelimit"], "\"login\";r=0;t=12");
    let (status, headers, _) = c.get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!headers.contains_key("ratelimit"), "{headers:?}");
    h.running.shutdown().await;

    // Set for the whole file, the default limit's answers carry it too.
    let h = Harness::start("", "[rate_limit]\nrate = 3\nheaders = \"always\"\n").await;
    let mut c = h.client("127.0.0.17").await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (status, headers, _) = c.get("/").await;
        seen.push((
            status,
            headers.get("ratelimit").map(|v| v.to_str().unwrap().to_owned()),
        ));
    }
    let expect = |r: &str| Some(format!("\"default\";{r}"));
    assert_eq!(
        seen,
        [
            (StatusCode::OK, expect("r=2;t=1")),
            (StatusCode::OK, expect("r=1;t=1")),
            (StatusCode::OK, expect("r=0;t=1")),
            (StatusCode::TOO_MANY_REQUESTS, expect("r=0;t=1")),
        ]
    );
    h.running.shutdown().await;
}

/// An API keyed at 3 a second: two addresses sending one key share its 3;
/// a client rotating keys is held to its address's default limit of 10.
#[tokio::test(start_paused = true)]
async fn an_api_key_limit_is_shared_across_addresses_and_rotation_meets_the_address_limit() {
    let h = Harness::start(
        "",
        "[rate_limit]\nrate = 10\n[[routes]]\nname = \"api\"\npath_prefix = \"/status\"\nrate = 3\nkey = \"header:X-API-Key\"\n",
    )
    .await;
    let mut a = h.client("127.0.0.13").await;
    let mut b = h.client("127.0.0.14").await;
    let mut ok = 0;
    for _ in 0..4 {
        for c in [&mut a, &mut b] {
            if c.get_with("/status/200", &[("x-api-key", "team-a")]).await.0 == StatusCode::OK {
                ok += 1;
            }
        }
    }
    assert_eq!(ok, 3);
    let mut rotating = h.client("127.0.0.15").await;
    let mut ok = 0;
    for i in 0..30 {
        let key = format!("k{i}");
        if rotating.get_with("/status/200", &[("x-api-key", &key)]).await.0 == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 10);
    let m = h.metrics().await;
    assert_eq!(get_requests(&m, "api", 429), 5.0 + 20.0);
    h.running.shutdown().await;
}

/// One route, two classes: requests with an API key get 5 a second per
/// key, anonymous ones 2 a second per address. A client that invents a key
/// per request is still held to its address's default limit of 10.
#[tokio::test(start_paused = true)]
async fn keyed_and_anonymous_requests_get_their_own_limits_on_one_route() {
    let h = Harness::start(
        "",
        "[rate_limit]\nrate = 10\n[[routes]]\nname = \"api\"\npath_prefix = \"/status\"\nkey = \"header:X-API-Key\"\nrate = 5\nanonymous_rate = 2\n",
    )
    .await;
    async fn passed(c: &mut common::Client, n: usize, key: impl Fn(usize) -> Option<String>) -> usize {
        let mut ok = 0;
        for i in 0..n {
            let key = key(i);
            let headers: Vec<_> = key.iter().map(|k| ("x-api-key", k.as_str())).collect();
            let (status, _, _) = c.get_with("/status/200", &headers).await;
            match status {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => {}
                other => panic!("unexpected {other}"),
            }
        }
        ok
    }
    let mut keyed = h.client("127.0.0.18").await;
    assert_eq!(passed(&mut keyed, 8, |_| Some("team-a".into())).await, 5);
    let mut anonymous = h.client("127.0.0.19").await;
    assert_eq!(passed(&mut anonymous, 8, |_| None).await, 2);
    let (_, headers, _) = anonymous.get("/status/200").await;
    assert_eq!(headers["ratelimit-policy"], "\"api\";q=2;w=1");
    // Another anonymous address has its own 2; an empty key is no key.
    let mut other = h.client("127.0.0.20").await;
    assert_eq!(passed(&mut other, 4, |_| Some(String::new())).await, 2);
    // Keyed from another address: the key's own 5 were spent above.
    let mut same_key = h.client("127.0.0.21").await;
    assert_eq!(passed(&mut same_key, 2, |_| Some("team-a".into())).await, 0);
    let mut inventor = h.client("127.0.0.22").await;
    assert_eq!(passed(&mut inventor, 30, |i| Some(format!("k{i}"))).await, 10);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_tracked_clients{table=\"limiter:api:anonymous\"}"),
        2.0
    );
    h.running.shutdown().await;
}

/// A key limit must count the key the upstream reads. Two `X-API-Key`
/// lines (a fresh one first, the real one after), two cookies of the name
/// or two parameters of the name could be counted by one copy and
/// authenticated by another: each is `400`, never forwarded. A query key
/// is compared decoded, so `%61bc` is `abc` to the limit as it is to the
/// application.
#[tokio::test(start_paused = true)]
async fn a_limit_key_sent_twice_is_400_and_a_query_key_counts_decoded() {
    let h = Harness::start(
        "",
        "[rate_limit]\nrate = 50\n[[routes]]\nname = \"api\"\npath_prefix = \"/status\"\nrate = 3\nkey = \"header:X-API-Key\"\n\
         [[routes]]\nname = \"session\"\npath_prefix = \"/delay\"\nrate = 3\nkey = \"cookie:sid\"\n\
         [[routes]]\nname = \"token\"\npath_prefix = \"/headers\"\nrate = 3\nkey = \"query:token\"\n",
    )
    .await;
    let mut c = h.client("127.0.0.23").await;
    for i in 0..5 {
        let fresh = format!("k{i}");
        let (status, _, _) = c
            .get_with("/status/200", &[("x-api-key", &fresh), ("x-api-key", "team-a")])
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "request {i}");
        let cookie = format!("sid={fresh}; sid=real");
        let (status, _, _) = c.get_with("/delay/0", &[("cookie", &cookie)]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "request {i}");
        let (status, _, _) = c
            .get_with(
                "/delay/0",
                &[("cookie", &format!("sid={fresh}")), ("cookie", "sid=real")],
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "request {i}");
        let (status, _, _) = c.get(&format!("/headers?token={fresh}&token=real")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "request {i}");
        let (status, _, _) = c.get(&format!("/headers?tok%65n={fresh}&token=real")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "request {i}");
    }
    // One copy is served; other names are not keys.
    let (status, _, _) = c
        .get_with(
            "/status/200",
            &[("x-api-key", "team-a"), ("x-other", "1"), ("x-other", "2")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // abc, spelled five ways, is one key: its limit of 3 holds.
    let mut ok = 0;
    for spelling in ["abc", "%61bc", "a%62%63", "%61%62%63", "ab%63"] {
        if c.get(&format!("/headers?token={spelling}")).await.0 == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 3);
    // So is a cookie's, quoted (RFC 6265 allows it; Go and Python unquote)
    // or escaped.
    let mut ok = 0;
    for spelling in ["abc", "\"abc\"", "%61bc", "\"%61bc\"", "a%62c"] {
        let cookie = format!("sid={spelling}");
        if c.get_with("/delay/0", &[("cookie", &cookie)]).await.0 == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 3);
    h.running.shutdown().await;
}

/// Palisade does not check API keys: any value of the header puts a request
/// in the keyed class, so a client inventing keys gets its address's
/// default limit (10 here) instead of `anonymous_rate` (1). What bounds it
/// is the application: a key it answers `401` costs reputation, three in a
/// row 10 points, and the inventor is refused (`403`) once its score falls
/// under 30, before its default limit is spent.
#[tokio::test(start_paused = true)]
async fn invented_keys_get_the_keyed_class_until_the_application_refuses_them() {
    let h = Harness::start(
        "",
        "[rate_limit]\nrate = 100\n[[routes]]\nname = \"api\"\npath_prefix = \"/status\"\nkey = \"header:X-API-Key\"\nrate = 50\nanonymous_rate = 1\n",
    )
    .await;
    let mut anonymous = h.client("127.0.0.24").await;
    assert_eq!(anonymous.get("/status/200").await.0, StatusCode::OK);
    assert_eq!(
        anonymous.get("/status/200").await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    let mut inventor = h.client("127.0.0.25").await;
    let mut seen = Vec::new();
    for i in 0..20 {
        let key = format!("made-up-{i}");
        seen.push(
            inventor
                .get_with("/status/401", &[("x-api-key", &key)])
                .await
                .0
                .as_u16(),
        );
    }
    // 70 → 30 after 12 answers of 401 (not yet under 30), 20 after 15.
    let expect: Vec<u16> = std::iter::repeat_n(401, 15)
        .chain(std::iter::repeat_n(403, 5))
        .collect();
    assert_eq!(seen, expect);
    h.running.shutdown().await;
}

#[tokio::test]
async fn slowloris_is_cut_at_the_header_deadline_while_others_are_served() {
    let h = Harness::start("header_read_timeout = \"1s\"", "").await;
    let mut slow = connect_from("127.0.0.10", h.proxy()).await;
    let started = Instant::now();
    let drip = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed_after = None;
    for b in drip {
        if slow.write_all(&[*b]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        // Meanwhile, a normal client is served.
        let mut c = h.client("127.0.0.11").await;
        assert_eq!(c.get("/").await.0, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 64];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await {
            // EOF, reset, or a 408: the connection is over.
            let _ = r;
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("slow connection was never closed");
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed too early: {closed_after:?}"
    );
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_connection_timeouts_total{kind=\"header\"}"),
        1.0
    );
    h.running.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let h = Harness::start("", "").await;
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ] {
        let text = raw_exchange("127.0.0.20", h.proxy(), garbage).await;
        assert!(
            text.starts_with("HTTP/1.1 400 ") || text.starts_with("HTTP/1.1 505 "),
            "{:?} -> {text}",
            String::from_utf8_lossy(garbage)
        );
    }
    h.running.shutdown().await;
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let h = Harness::start("max_header_bytes = 8192", "").await;
    let mut c = h.client("127.0.0.12").await;
    let big = "a".repeat(10_000);
    let (status, _, _) = c.get_with("/", &[("x-big", &big)]).await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    h.running.shutdown().await;
}

#[tokio::test]
async fn upstream_timeout_is_504_and_refused_upstream_is_502() {
    let h = Harness::start("", "[upstream]\nresponse_timeout = \"300ms\"\n").await;
    let mut c = h.client("127.0.0.13").await;
    assert_eq!(c.get("/delay/3000").await.0, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(c.get("/delay/10").await.0, StatusCode::OK);
    h.running.shutdown().await;

    // A port nobody listens on: bind one, note it, close it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = Harness::start_with_upstream(&format!("http://{dead}"), "", "", dead).await;
    let mut c = h.client("127.0.0.13").await;
    assert_eq!(c.get("/").await.0, StatusCode::BAD_GATEWAY);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_upstream_errors_total{kind=\"connect\"}"),
        1.0
    );
    h.running.shutdown().await;
}

#[tokio::test]
async fn bodies_stream_both_ways() {
    let h = Harness::start("", "").await;
    let mut c = h.client("127.0.0.14").await;
    let (status, _, body) = c.get("/bytes/3000000").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 3_000_000);
    let payload = "p".repeat(500_000);
    let (status, _, echoed) = c.request("POST", "/echo", &[], &payload).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echoed.len(), payload.len());
    h.running.shutdown().await;
}

#[tokio::test]
async fn a_stalled_request_body_gets_408() {
    let h = Harness::start("body_read_timeout = \"500ms\"", "").await;
    let text = raw_exchange(
        "127.0.0.15",
        h.proxy(),
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-a-little",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    h.running.shutdown().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let h = Harness::start("", "").await;
    let mut sender = common::h2_client("127.0.0.16", h.proxy()).await;
    let req = Request::get(format!("http://{}/headers", h.proxy()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    // Forwarded upstream as HTTP/1.1 with a Host taken from :authority.
    assert!(body.contains("HTTP/1.1"), "{body}");
    assert!(body.contains(&format!("host: {}\n", h.proxy())), "{body}");
    h.running.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let h = Harness::start("shutdown_grace = \"5s\"", "").await;
    let proxy = h.proxy();
    let mut c = h.client("127.0.0.17").await;
    let in_flight = tokio::spawn(async move { c.get("/delay/700").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let admin = h.admin();
    let shutdown = tokio::spawn(h.running.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No longer accepting.
    assert!(tokio::net::TcpStream::connect(proxy).await.is_err());
    let _ = admin;
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "delayed 700 ms\n");
    shutdown.await.unwrap();
}

/// An upstream whose `/slow` reports its arrival on `arrived`, then answers
/// only once `release` is notified; anything else answers `ok` at once.
async fn gated_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    std::sync::Arc<tokio::sync::Notify>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (arrived_tx, gate) = (arrived_tx.clone(), gate.clone());
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (arrived_tx, gate) = (arrived_tx.clone(), gate.clone());
                async move {
                    let slow = req.uri().path() == "/slow";
                    if slow {
                        let _ = arrived_tx.send(());
                        gate.notified().await;
                    }
                    let body = if slow { "slow\n" } else { "ok\n" };
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, arrived, release)
}

/// HTTP/2 through a drain: served during the delay, on the open connection
/// and on a new one; when the delay ends the stream in flight completes and
/// the connection is closed cleanly after GOAWAY (the client's connection
/// task ends without error), and new connections are refused.
#[tokio::test]
async fn an_h2_connection_is_served_through_the_drain_delay_then_goes_away_cleanly() {
    let (upstream, mut arrived, release) = gated_upstream().await;
    let h = Harness::start_with_upstream(
        &format!("http://{upstream}"),
        "drain_delay = \"1h\"",
        "",
        upstream,
    )
    .await;
    let (proxy, admin) = (h.proxy(), h.admin());
    let stream = connect_from("127.0.0.21", proxy).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let get = |path: &str| {
        Request::get(format!("http://{proxy}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(
        sender.send_request(get("/")).await.unwrap().status(),
        StatusCode::OK
    );

    let (skip, skipped) = tokio::sync::oneshot::channel::<()>();
    let drain = tokio::spawn(h.running.drain(async {
        let _ = skipped.await;
    }));
    let mut probe = common::Client::connect("127.0.0.1", admin).await;
    while probe.get("/readyz").await.0 != StatusCode::SERVICE_UNAVAILABLE {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        sender.send_request(get("/")).await.unwrap().status(),
        StatusCode::OK
    );
    let mut fresh = common::h2_client("127.0.0.22", proxy).await;
    assert_eq!(
        fresh.send_request(get("/")).await.unwrap().status(),
        StatusCode::OK
    );
    let slow = tokio::spawn(sender.send_request(get("/slow")));
    arrived.recv().await.unwrap();

    skip.send(()).unwrap();
    while tokio::net::TcpStream::connect(proxy).await.is_ok() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    release.notify_one();
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"slow\n");
    conn.await.unwrap().unwrap();
    drain.await.unwrap();
}

#[tokio::test]
async fn admin_changes_need_the_token() {
    let h = Harness::start("", "").await;
    let mut admin = h.admin_client().await;
    let put = |token: Option<&'static str>| {
        let mut r = Request::put("/api/v1/reputation/127.0.0.18").header("host", "localhost");
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.body(Full::new(Bytes::from_static(b"{\"score\": 5}"))).unwrap()
    };
    assert_eq!(admin.send(put(None)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(admin.send(put(Some("wrong"))).await.0, StatusCode::UNAUTHORIZED);
    let (status, _, body) = admin.send(put(Some("test-token-0123456789"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"blocked\":true"), "{body}");
    // The proxy enforces it at once.
    let mut c = h.client("127.0.0.18").await;
    let (status, _, body) = c.get("/").await;
    assert_eq!((status, body.as_str()), (StatusCode::FORBIDDEN, "Access denied"));
    // DELETE resets; bad input is a clear 400.
    let del = Request::delete("/api/v1/reputation/127.0.0.18")
        .header("host", "localhost")
        .header("authorization", "Bearer test-token-0123456789")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = admin.send(del).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"score\":70.0"), "{body}");
    assert_eq!(c.get("/").await.0, StatusCode::OK);
    let (status, _, body) = admin.get("/api/v1/reputation/not-an-ip").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("not an IP address"));
    let bad = Request::put("/api/v1/reputation/127.0.0.18")
        .header("host", "localhost")
        .header("authorization", "Bearer test-token-0123456789")
        .body(Full::new(Bytes::from_static(b"{\"score\": 900}")))
        .unwrap();
    assert_eq!(admin.send(bad).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(admin.get("/healthz").await.0, StatusCode::OK);
    assert_eq!(admin.get("/readyz").await.0, StatusCode::OK);
    h.running.shutdown().await;
}

#[tokio::test]
async fn idle_keepalive_connections_are_closed_after_idle_timeout() {
    let h = Harness::start("idle_timeout = \"500ms\"\nheader_read_timeout = \"5s\"", "").await;
    let text = raw_exchange("127.0.0.19", h.proxy(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    // Closed by the idle deadline, not the (longer) header deadline.
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_connection_timeouts_total{kind=\"idle\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "palisade_connection_timeouts_total{kind=\"header\"}"),
        0.0
    );
    h.running.shutdown().await;
}

#[tokio::test]
async fn ipv6_clients_are_served_and_limited_by_prefix() {
    let (upstream, _, serve) = common::demo().await;
    tokio::spawn(serve);
    let toml = format!(
        "[server]\nlisten = \"[::1]:0\"\nupstreams = [\"http://{upstream}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[rate_limit]\nrate = 3\n"
    );
    let mut config = palisade_proxy::config::Config::parse(&toml, "v6.toml", &Default::default()).unwrap();
    config.syn = None;
    let running = palisade_proxy::start(config).await.unwrap();
    let stream = tokio::net::TcpStream::connect(running.proxy_addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    let mut forwarded = String::new();
    for _ in 0..5 {
        let req = Request::get("/headers")
            .header("host", "v6")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        statuses.push(resp.status().as_u16());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if forwarded.is_empty() {
            forwarded = String::from_utf8_lossy(&body).into_owned();
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert!(forwarded.contains("x-forwarded-for: ::1\n"), "{forwarded}");
    assert!(
        forwarded.contains("forwarded: for=\"[::1]\";proto=http"),
        "{forwarded}"
    );
    running.shutdown().await;
}

/// A client rotating through the addresses of its /64 is one client: five
/// addresses of 2001:2::/64 (the IPv6 benchmarking range) share one limit of
/// 3, and another /64 has its own. The addresses arrive the way they do
/// behind a load balancer: in `X-Forwarded-For` from a trusted proxy.
#[tokio::test]
async fn two_addresses_of_one_ipv6_64_share_a_limit() {
    let h = Harness::start(
        "",
        "[clients]\ntrusted_proxies = [\"127.0.0.41/32\"]\n[rate_limit]\nrate = 3\n",
    )
    .await;
    let mut lb = h.client("127.0.0.41").await;
    let mut statuses = Vec::new();
    for client in [
        "2001:2::1",
        "2001:2::2",
        "2001:2::ffff:3",
        "2001:2::abcd:0:0:4",
        "2001:2::5",
    ] {
        statuses.push(lb.get_with("/", &[("x-forwarded-for", client)]).await.0.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let (status, _, _) = lb.get_with("/", &[("x-forwarded-for", "2001:2:0:1::1")]).await;
    assert_eq!(status, StatusCode::OK, "another /64 is another client");
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "palisade_decisions_total{decision=\"rate_limited\"}"),
        2.0
    );
}

/// The metrics helper refuses an absent series: read as 0, a misnamed
/// metric would pass every `== 0` check (it did before).
#[test]
#[should_panic(expected = "no metric series palisade_no_such_total")]
fn the_metric_helper_fails_on_an_absent_series() {
    metric("palisade_requests_total 3\n", "palisade_no_such_total");
}
