//! A line of the access log allocates nothing once the writer has handed
//! its buffers back, proven with a counting allocator (per thread: the
//! writer thread's own work is not the request path's).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use http::Version;
use palisade_proxy::access_log::{
    AccessLog, AccessLogSettings, Destination, Format, Outcome, Pending, RequestInfo,
};
use prometheus_client::metrics::counter::Counter;

#[path = "common/counting.rs"]
mod counting;

use counting::allocs;

#[global_allocator]
static GLOBAL: counting::Counting = counting::Counting;

const LINES: usize = 200;

/// `held.capacity()` requests in flight at once, then their lines: so
/// that many buffers are out of the pool together.
fn lines(log: &AccessLog, held: &mut Vec<Pending>) {
    let ua = b"Mozilla/5.0 (X11; Linux x86_64) \"quoted\" \xff".as_slice();
    for _ in 0..held.capacity() {
        held.push(log.begin(&RequestInfo {
            client: "203.0.113.9".parse().unwrap(),
            peer: "2001:db8::1".parse().unwrap(),
            method: "GET",
            target: "/search?q=palisade&page=2",
            version: Version::HTTP_11,
            referer: Some(b"https://example.com/"),
            user_agent: Some(ua),
            ja4: Some("t13d1516h2_8daaf6152771_e5627efa2ab1"),
        }));
    }
    for (i, p) in held.drain(..).enumerate() {
        log.finish(
            p,
            &Outcome {
                status: 200,
                bytes: Some(i as u64),
                decision: "allowed",
                upstream_status: Some(200),
                latency: 1_234_567,
                unix_ms: 1_796_302_224_005,
            },
        );
    }
}

fn steady_state_allocations(format: Format) -> u64 {
    let path = std::env::temp_dir().join(format!("palisade-access-alloc-{}-{format:?}", std::process::id()));
    let dropped = Counter::default();
    let log = AccessLog::start(
        &AccessLogSettings {
            format,
            destination: Destination::File(path.clone()),
            refusal_budget: 100,
        },
        dropped.clone(),
    )
    .unwrap();
    let mut held = Vec::with_capacity(LINES);
    lines(&log, &mut held);
    // The writer returns each buffer once its line is written.
    for _ in 0..3000 {
        if log.idle_buffers() >= LINES {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(log.idle_buffers() >= LINES, "{} buffers back", log.idle_buffers());
    let before = allocs();
    lines(&log, &mut held);
    let n = allocs() - before;
    assert_eq!(dropped.get(), 0);
    for _ in 0..3000 {
        if std::fs::read_to_string(&path).unwrap().lines().count() == 2 * LINES {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2 * LINES);
    std::fs::remove_file(&path).unwrap();
    n
}

#[test]
fn a_combined_line_allocates_nothing_in_steady_state() {
    assert_eq!(steady_state_allocations(Format::Combined), 0);
}

#[test]
fn a_json_line_allocates_nothing_in_steady_state() {
    assert_eq!(steady_state_allocations(Format::Json), 0);
}

/// The log is opened once: a reload that changes `[access_log]` applies the
/// rest and says a restart is needed, and lines keep going to the file the
/// daemon opened.
#[tokio::test]
async fn a_reload_that_changes_the_access_log_asks_for_a_restart() {
    use palisade_proxy::config::{Config, Overrides};
    use palisade_proxy::proxy::{App, ConfigSource};

    let dir = std::env::temp_dir().join(format!("palisade-access-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("palisade.toml");
    let config = |format: &str, rate: u32| {
        format!(
            "[server]\nupstreams = [\"http://127.0.0.1:9\"]\n[rate_limit]\nrate = {rate}\n\
             [access_log]\nenabled = true\nformat = \"{format}\"\npath = \"access.log\"\n"
        )
    };
    std::fs::write(&path, config("combined", 100)).unwrap();
    let loaded = Config::load(&path, &Overrides::default()).unwrap();
    let source = ConfigSource {
        path: path.clone(),
        overrides: Overrides::default(),
        token: None,
    };
    let app = App::new(loaded, Some(source));
    app.open_access_log().unwrap();
    assert!(dir.join("access.log").exists());

    std::fs::write(&path, config("json", 100)).unwrap();
    let report = app.reload().await.unwrap();
    assert_eq!(report.needs_restart, ["access_log"]);
    // Unchanged: nothing to restart for.
    // Compared with the file loaded last: only the rate changed now.
    std::fs::write(&path, config("json", 50)).unwrap();
    let report = app.reload().await.unwrap();
    assert!(report.needs_restart.is_empty(), "{:?}", report.needs_restart);
    std::fs::remove_dir_all(&dir).unwrap();
}
