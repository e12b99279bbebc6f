//! Every metric the shipped Grafana dashboard queries is exported by a
//! running Palisade.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::Harness;

/// Metric names in a PromQL expression, as their exposition base name
/// (`palisade_requests_total` → `palisade_requests`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("palisade_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_sum", "_count", "_total"] {
            if let Some(base) = name.strip_suffix(suffix) {
                name = base;
                break;
            }
        }
        names.push(name.to_string());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn the_dashboard_queries_only_exported_metrics() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/grafana/palisade.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            queried.extend(metric_names(t["expr"].as_str().unwrap()));
        }
    }
    assert!(queried.len() >= 15, "the dashboard queries only {queried:?}");

    let h = Harness::start("", "").await;
    let mut c = h.client("127.0.0.90").await;
    c.get("/").await;
    let text = h.metrics().await;
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nobody exports: {missing:?}"
    );
    h.running.shutdown().await;
}

#[test]
fn names_are_extracted_from_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(palisade_request_duration_seconds_bucket[5m])))"
        ),
        ["palisade_request_duration_seconds"]
    );
    assert_eq!(
        metric_names("palisade_tracked_clients + rate(palisade_requests_total[1m])"),
        ["palisade_tracked_clients", "palisade_requests"]
    );
}

#[test]
fn the_kubernetes_config_is_valid() {
    let path = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/k8s/proxy/palisade.toml"
    ));
    let config = palisade_proxy::config::Config::load(path, &Default::default()).unwrap();
    // Probes and Prometheus reach the admin port from outside the pod.
    assert!(!config.admin.listen.ip().is_loopback());
}

async fn profile_request(
    admin: &mut common::Client,
    query: &str,
    token: Option<&str>,
) -> (http::StatusCode, http::HeaderMap, Vec<u8>) {
    let mut req = http::Request::get(format!("/debug/pprof/profile?{query}")).header("host", "localhost");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let (status, headers, body) = admin
        .send_raw(req.body(http_body_util::Full::new(bytes::Bytes::new())).unwrap())
        .await;
    (status, headers, body.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_profiles_on_demand() {
    use pprof::protos::Message;
    let h = Harness::start("", "").await;
    let mut admin = h.admin_client().await;
    // Token required, even on loopback.
    let (status, _, _) = profile_request(&mut admin, "seconds=1", None).await;
    assert_eq!(status, http::StatusCode::UNAUTHORIZED);
    let (status, _, _) = profile_request(&mut admin, "seconds=99", Some("test-token-0123456789")).await;
    assert_eq!(status, http::StatusCode::BAD_REQUEST);

    // Some work to sample while the profile runs; a second profile waits its turn.
    let proxy = h.proxy();
    let load = tokio::spawn(async move {
        let mut c = common::Client::connect("127.0.0.91", proxy).await;
        for _ in 0..200 {
            c.get("/bytes/10000").await;
        }
    });
    let admin_addr = h.admin();
    let second = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut a = common::Client::connect("127.0.0.1", admin_addr).await;
        profile_request(&mut a, "seconds=1", Some("test-token-0123456789"))
            .await
            .0
    });
    let (status, headers, body) =
        profile_request(&mut admin, "seconds=1", Some("test-token-0123456789")).await;
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(headers["content-type"], "application/octet-stream");
    let profile = pprof::protos::Profile::parse_from_bytes(&body).expect("not a pprof profile");
    assert!(!profile.sample_type.is_empty());
    assert!(
        profile.duration_nanos >= 900_000_000,
        "{}",
        profile.duration_nanos
    );
    assert_eq!(second.await.unwrap(), http::StatusCode::CONFLICT);
    load.await.unwrap();

    let load = tokio::spawn(async move {
        let mut c = common::Client::connect("127.0.0.92", proxy).await;
        for _ in 0..200 {
            c.get("/bytes/10000").await;
        }
    });
    let (status, headers, body) =
        profile_request(&mut admin, "seconds=1&format=svg", Some("test-token-0123456789")).await;
    load.await.unwrap();
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(headers["content-type"], "image/svg+xml");
    let svg = String::from_utf8_lossy(&body);
    assert!(svg.contains("<svg"), "{}", &svg[..svg.len().min(300)]);
    h.running.shutdown().await;
}
