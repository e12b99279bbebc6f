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
        "/../../deploy/k8s/palisade.toml"
    ));
    let config = palisade_proxy::config::Config::load(path, &Default::default()).unwrap();
    // Probes and Prometheus reach the admin port from outside the pod.
    assert!(!config.admin.listen.ip().is_loopback());
}
