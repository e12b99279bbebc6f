//! Every metric the shipped Grafana dashboard and alert rules query is
//! exported by a running Palisade, counters are only read through rates,
//! and the rules pass `promtool check rules` and their unit tests.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::Harness;

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy")).join(path)
}

/// Metric names in a PromQL expression (`palisade_*`, `process_*`), as
/// written: `palisade_requests_total`, `palisade_x_bucket`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = ["palisade_", "process_"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The metric each `rate(`, `irate(` and `increase(` is applied to.
fn rated(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for f in ["rate(", "increase("] {
        // `irate(` contains `rate(`.
        for (at, _) in expr.match_indices(f) {
            if let Some(name) = metric_names(&expr[at + f.len()..]).into_iter().next() {
                out.push(name);
            }
        }
    }
    out
}

/// Every series name a running Palisade exports, as PromQL names it, with
/// its type (OpenMetrics lists empty families too).
async fn exported(h: &Harness) -> BTreeMap<String, String> {
    let (_, _, text) = h
        .admin_client()
        .await
        .get_with(
            "/metrics",
            &[("accept", "application/openmetrics-text; version=1.0.0")],
        )
        .await;
    let mut kinds = BTreeMap::new();
    for (name, kind) in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
    {
        let names = match kind {
            "counter" => vec![format!("{name}_total")],
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{name}{s}"))
                .collect(),
            _ => vec![name.to_string()],
        };
        for n in names {
            kinds.insert(n, kind.to_string());
        }
    }
    kinds
}

/// Problems with expressions: metrics nobody exports, rates of gauges.
fn problems(exprs: &[String], kinds: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for e in exprs {
        for name in metric_names(e) {
            if !kinds.contains_key(&name) {
                out.push(format!("{name} is not exported (in {e})"));
            }
        }
        for name in rated(e) {
            match kinds.get(&name).map(String::as_str) {
                Some("counter" | "histogram") | None => {}
                Some(kind) => out.push(format!("rate/increase of the {kind} {name} (in {e})")),
            }
        }
    }
    out
}

#[tokio::test]
async fn the_dashboard_and_alerts_query_exported_counters_as_counters() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/palisade.json")).unwrap()).unwrap();
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for v in ["datasource", "job", "instance"] {
        assert!(variables.contains(&v), "no ${v} variable: {variables:?}");
    }
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            let e = t["expr"].as_str().unwrap();
            // Each metric is narrowed to the chosen job and instances.
            for name in metric_names(e) {
                assert!(
                    e.contains(&format!("{name}{{job=~\"$job\",instance=~\"$instance\"}}")),
                    "{name} without the job/instance selector in {e}"
                );
            }
            exprs.push(e.to_string());
        }
    }
    assert!(
        exprs.len() >= 30,
        "the dashboard has only {} queries",
        exprs.len()
    );
    // The rules' expressions, and their text: a metric named anywhere must exist.
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let rule_lines: Vec<String> = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(str::to_string)
        .collect();
    assert!(rules.matches("- alert:").count() >= 10);

    let h = Harness::start("", "").await;
    let mut c = h.client("127.0.0.90").await;
    c.get("/").await;
    let mut kinds = exported(&h).await;
    // Labelled by the spawn site that grew, known only once one does: the
    // family has no series (and no TYPE line) before the first alert.
    kinds.insert("palisade_task_growth_alerts_total".into(), "counter".into());
    for name in [
        "palisade_syn_seen_total",
        "palisade_xdp_packets_total",
        "process_cpu_seconds_total",
    ] {
        assert_eq!(kinds.get(name).map(String::as_str), Some("counter"), "{name}");
    }
    let mut found = problems(&exprs, &kinds);
    found.extend(problems(&rule_lines, &kinds));
    assert!(found.is_empty(), "{found:#?}");
    h.running.shutdown().await;
}

#[test]
fn names_and_rated_metrics_are_extracted_from_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(palisade_request_duration_seconds_bucket[5m])))"
        ),
        ["palisade_request_duration_seconds_bucket"]
    );
    let e = "palisade_tracked_clients + irate(palisade_requests_total[1m]) / process_max_fds";
    assert_eq!(
        metric_names(e),
        [
            "palisade_tracked_clients",
            "palisade_requests_total",
            "process_max_fds"
        ]
    );
    assert_eq!(rated(e), ["palisade_requests_total"]);
    let kinds: BTreeMap<String, String> = [("palisade_syn_half_open", "gauge")]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(
        problems(&["increase(palisade_syn_half_open[5m])".into()], &kinds),
        ["rate/increase of the gauge palisade_syn_half_open (in increase(palisade_syn_half_open[5m]))"]
    );
}

/// Runs promtool in deploy/prometheus; under CI a missing promtool fails.
fn promtool(args: &[&str]) {
    let out = match std::process::Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool (Debian package prometheus) is missing in CI: {e}"
            );
            eprintln!("skipped promtool {args:?}: {e}");
            return;
        }
    };
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_and_scrape_config_pass_promtool_and_their_unit_tests() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts.test.yml"]);
    promtool(&["check", "config", "prometheus.yml"]);
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
