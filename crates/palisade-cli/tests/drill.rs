//! `palisade drill` as root: it cleans up after itself when interrupted,
//! and its quick run reports every attack with a verdict.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

/// Root, or a skip with the reason (a failure under CI=true).
fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "the drill test needs root in CI"
        );
        eprintln!("skipped: palisade drill needs root");
    }
    root
}

/// Namespaces of the drill with this pid, as `ip netns list` shows them.
fn left_by(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("palisade-drill-{pid}-")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn an_interrupted_drill_leaves_no_namespace_and_exits_non_zero() {
    if !root() {
        return;
    }
    let child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["drill", "--quick", "--only", "http-flood"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until its namespaces exist, then interrupt it mid-run.
    let mut seen = false;
    for _ in 0..100 {
        if left_by(pid).len() == 3 {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(seen, "the drill never made its namespaces");
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "an interrupted drill exited 0");
    assert_eq!(left_by(pid), Vec::<String>::new());
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(" pd-"),
        "a drill veth is left in the root namespace"
    );
}

#[test]
fn a_quick_drill_reports_every_attack_with_a_verdict() {
    if !root() {
        return;
    }
    let json = std::env::temp_dir().join(format!("palisade-drill-test-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["drill", "--quick", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let _ = std::fs::remove_file(&json);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let plan = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["drill", "--quick", "--dry-run"])
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&plan.stdout);
    let attacks = report["attacks"].as_array().unwrap();
    for a in attacks {
        let name = a["name"].as_str().unwrap();
        assert!(plan.contains(name), "{name} is not in the plan");
        assert!(a["verdict"]["pass"].is_boolean(), "{name} has no verdict");
    }
    assert!(attacks.len() >= 3, "{text}");
    assert!(report["legit"].as_array().unwrap().len() > 10, "{text}");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}
