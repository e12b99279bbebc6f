//! Breaker and reload over real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::{Client, Harness, config_text, demo, metric};
use http::{Request, StatusCode};
use http_body_util::Full;
use palisade_proxy::config::{Config, Overrides};
use palisade_proxy::proxy::ConfigSource;

/// On paused time: the breaker's open period passes by `advance`, not by
/// a sleep (the daemon's clock is tokio's).
#[tokio::test(start_paused = true)]
async fn failing_upstream_trips_the_breaker_then_probes_close_it() {
    let h = Harness::start("", "[breaker]\nopen_for = \"1s\"\n").await;
    let upstream = h.upstream.to_string();
    let mut c = h.client("127.0.0.30").await;
    for _ in 0..5 {
        assert_eq!(c.get("/status/500").await.0, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(h.upstream_hits.load(Ordering::Relaxed), 5);
    // Open: refused without calling the upstream.
    for _ in 0..10 {
        let (status, headers, _) = c.get("/").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["retry-after"], "1");
    }
    assert_eq!(h.upstream_hits.load(Ordering::Relaxed), 5);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, &format!("palisade_breaker_state{{upstream=\"{upstream}\"}}")),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            &format!(
                "palisade_breaker_transitions_total{{upstream=\"{upstream}\",from=\"closed\",to=\"open\"}}"
            )
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "palisade_decisions_total{decision=\"breaker_open\"}"),
        10.0
    );
    let mut admin = h.admin_client().await;
    let (_, _, body) = admin.get("/api/v1/breakers").await;
    assert!(body.contains("\"state\":\"open\""), "{body}");

    // After open_for, three probes succeed and close it.
    tokio::time::advance(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        assert_eq!(c.get("/").await.0, StatusCode::OK);
    }
    assert_eq!(h.upstream_hits.load(Ordering::Relaxed), 8);
    let (_, _, body) = admin.get("/api/v1/breakers").await;
    assert!(body.contains("\"state\":\"closed\""), "{body}");
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            &format!(
                "palisade_breaker_transitions_total{{upstream=\"{upstream}\",from=\"half_open\",to=\"closed\"}}"
            )
        ),
        1.0
    );
    h.running.shutdown().await;
}

/// On paused time, as above; the upstream's delay and the response
/// timeout race on it too, so no answer's lateness depends on the host.
#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_and_slow_answers_count_as_timeouts() {
    let h = Harness::start(
        "",
        "[upstream]\nresponse_timeout = \"200ms\"\n[breaker]\nopen_for = \"1s\"\nmin_requests = 3\n",
    )
    .await;
    let mut c = h.client("127.0.0.31").await;
    for _ in 0..3 {
        assert_eq!(c.get("/delay/900").await.0, StatusCode::GATEWAY_TIMEOUT);
    }
    assert_eq!(c.get("/").await.0, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::advance(Duration::from_millis(1100)).await;
    // The probe reaches the upstream (an open breaker's 503 would look the
    // same) and fails: open again at once.
    let hits = h.upstream_hits.load(Ordering::Relaxed);
    assert_eq!(c.get("/status/503").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.upstream_hits.load(Ordering::Relaxed), hits + 1);
    let hits = hits + 1;
    assert_eq!(c.get("/").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.upstream_hits.load(Ordering::Relaxed), hits);
    h.running.shutdown().await;
}

fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-reload-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("palisade.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn start_from_file(path: &std::path::Path) -> palisade_proxy::Running {
    let mut config = Config::load(path, &Overrides::default()).unwrap();
    // As root the SYN defense would change the host's firewall.
    config.syn = None;
    let source = ConfigSource {
        path: path.to_path_buf(),
        overrides: Overrides::default(),
        token: None,
    };
    palisade_proxy::start_reloadable(config, Some(source))
        .await
        .unwrap()
}

async fn reload(admin: &mut Client) -> (StatusCode, String) {
    let req = Request::post("/api/v1/reload")
        .header("host", "localhost")
        .header("authorization", "Bearer test-token-0123456789")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = admin.send(req).await;
    (status, body)
}

#[tokio::test]
async fn reload_applies_live_while_a_request_is_in_flight_and_rejects_bad_files() {
    let (upstream, _, serve) = demo().await;
    tokio::spawn(serve);
    let url = format!("http://{upstream}");
    let path = temp_config("live", &config_text(&url, "", ""));
    let running = start_from_file(&path).await;
    let proxy = running.proxy_addr;
    let mut admin = Client::connect("127.0.0.1", running.admin_addr).await;

    // A long request in flight across the reload.
    let mut slow = Client::connect("127.0.0.32", proxy).await;
    let in_flight = tokio::spawn(async move { slow.get("/delay/1000").await });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut c = Client::connect("127.0.0.33", proxy).await;
    for _ in 0..3 {
        assert_eq!(c.get("/").await.0, StatusCode::OK);
    }
    std::fs::write(&path, config_text(&url, "", "[rate_limit]\nrate = 5\n")).unwrap();
    let (status, body) = reload(&mut admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The 3 requests already made this second count against the new limit.
    let statuses: Vec<_> = futures_statuses(&mut c, 4).await;
    assert_eq!(statuses, [200, 200, 429, 429]);
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "delayed 1000 ms\n"));

    // A broken file: rejected with file:line:col, the old config keeps serving.
    std::fs::write(&path, config_text(&url, "", "[rate_limit]\nrate = 0\n")).unwrap();
    let (status, body) = reload(&mut admin).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let expected = format!(
        "{}:10:1: rate_limit.rate: must be between 1 and 10000000",
        path.display()
    );
    assert!(body.contains(&expected), "{body}");
    let m = String::from_utf8(admin.get("/metrics").await.2.into_bytes()).unwrap();
    assert_eq!(metric(&m, "palisade_config_last_reload_success"), 0.0);
    // The file watcher may have tried the broken file as well.
    assert!(metric(&m, "palisade_config_reloads_total{kind=\"error\"}") >= 1.0);
    let mut fresh = Client::connect("127.0.0.34", proxy).await;
    assert_eq!(
        futures_statuses(&mut fresh, 7).await,
        [200, 200, 200, 200, 200, 429, 429]
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_changed_file_is_picked_up_by_the_watcher() {
    let (upstream, _, serve) = demo().await;
    tokio::spawn(serve);
    let url = format!("http://{upstream}");
    let path = temp_config("watch", &config_text(&url, "", ""));
    let running = start_from_file(&path).await;
    let mut admin = Client::connect("127.0.0.1", running.admin_addr).await;
    // Replace by rename, as editors and Kubernetes do.
    let tmp = path.with_extension("new");
    std::fs::write(
        &tmp,
        config_text(&url, "", "[clients]\ndeny = [\"127.0.0.35\"]\n"),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let mut c = Client::connect("127.0.0.35", running.proxy_addr).await;
    // The watcher polls every second and debounces: give it a bounded while.
    let mut denied = false;
    for _ in 0..50 {
        if c.get("/").await.0 == StatusCode::FORBIDDEN {
            denied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(denied, "the watcher never applied the new deny list");
    let m = admin.get("/metrics").await.2;
    assert_eq!(metric(&m, "palisade_config_reloads_total{kind=\"ok\"}"), 1.0);
    running.shutdown().await;
}

async fn futures_statuses(c: &mut Client, n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(c.get("/").await.0.as_u16());
    }
    out
}

#[tokio::test]
async fn a_failing_fingerprint_is_degraded_then_refused_while_others_pass() {
    // Upstream breaker off: this is about one client, not the upstream.
    let h = Harness::start(
        "",
        "[breaker]\nenabled = false\n[adaptive_breaker]\nslow_first_byte = \"50ms\"\n",
    )
    .await;
    let mut bot = h.client("127.0.0.40").await;
    let ua = [("user-agent", "bot/1.0")];
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(bot.get_with("/status/500", &ua).await.0.as_u16());
    }
    // Ten 500s degrade (volume floor), the eleventh opens; then 503.
    assert_eq!(&statuses[..11], &[500; 11]);
    assert_eq!(statuses[11], 503);
    let hits = h.upstream_hits.load(Ordering::Relaxed);
    assert_eq!(bot.get_with("/", &ua).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.upstream_hits.load(Ordering::Relaxed), hits);
    // Same address, another User-Agent: another fingerprint.
    assert_eq!(
        bot.get_with("/", &[("user-agent", "browser/2")]).await.0,
        StatusCode::OK
    );

    // Slow first bytes count too.
    let mut slow = h.client("127.0.0.41").await;
    let mut last = StatusCode::OK;
    for _ in 0..12 {
        last = slow.get("/delay/100").await.0;
    }
    assert_eq!(last, StatusCode::SERVICE_UNAVAILABLE);

    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "palisade_adaptive_breaker_transitions_total{from=\"closed\",to=\"degraded\",reason=\"failure_rate\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(&m, "palisade_adaptive_breaker_clients{state=\"open\"}"),
        2.0
    );
    assert!(metric(&m, "palisade_decisions_total{decision=\"client_breaker_open\"}") >= 3.0);
    let mut admin = h.admin_client().await;
    let (_, _, body) = admin.get("/api/v1/breakers").await;
    assert!(body.contains("\"ip\":\"127.0.0.40\""), "{body}");
    assert!(body.contains("\"state\":\"open\""), "{body}");
    h.running.shutdown().await;
}

#[tokio::test]
async fn unparseable_request_heads_count_double_against_the_source() {
    let h = Harness::start("", "").await;
    for _ in 0..6 {
        let reply = common::raw_exchange("127.0.0.42", h.proxy(), b"NOT HTTP AT ALL\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    }
    let mut c = h.client("127.0.0.42").await;
    // Six parse failures (weight 2.0) and a few requests: rate > 0.5 once
    // the volume floor of 10 is reached.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(c.get("/").await.0.as_u16());
    }
    assert_eq!(statuses.last(), Some(&503), "{statuses:?}");
    h.running.shutdown().await;
}
