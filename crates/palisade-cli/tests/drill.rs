//! `palisade drill` as root: it cleans up after itself when interrupted,
//! and its quick run reports every attack with a verdict.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

/// One drill at a time: two would share the CPU, and each would judge
/// the other's floods as its own.
static ONE_DRILL: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    let _one = ONE_DRILL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
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

/// The attack names of a `--dry-run` plan: the catalog.
fn planned(plan: &str) -> Vec<String> {
    plan.lines()
        .skip_while(|l| l.trim() != "attacks")
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Attacks that may be skipped in CI, and why: they need what CI does not
/// give the drill.
const MAY_SKIP: &[&str] = &["forged-redis"]; // needs --redis

/// The drill as CI runs it: every attack of the catalog runs (but those
/// that need something CI does not give) and every verdict passes. A
/// failed one fails this test with its reasons.
#[test]
fn a_quick_drill_reports_every_attack_with_a_verdict() {
    if !root() {
        return;
    }
    let _one = ONE_DRILL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let json = std::env::temp_dir().join(format!("palisade-drill-test-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["drill", "--quick", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let _ = std::fs::remove_file(&json);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let plan = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["drill", "--quick", "--dry-run"])
        .output()
        .unwrap();
    let catalog = planned(&String::from_utf8_lossy(&plan.stdout));
    assert!(catalog.len() >= 9, "the plan lists {catalog:?}");
    let attacks = report["attacks"].as_array().unwrap();
    let reported: Vec<&str> = attacks.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(reported, catalog, "the report's attacks are not the catalog");
    let mut failed = Vec::new();
    for a in attacks {
        let name = a["name"].as_str().unwrap();
        if let Some(why) = a["skipped"].as_str() {
            if !MAY_SKIP.contains(&name) {
                failed.push(format!("{name} was skipped: {why}"));
            }
            continue;
        }
        match a["verdict"]["pass"].as_bool() {
            Some(true) => {}
            Some(false) => failed.push(format!("{name} failed: {}", a["verdict"]["reasons"])),
            None => failed.push(format!("{name} has no verdict")),
        }
    }
    assert!(failed.is_empty(), "{}\n{stdout}", failed.join("\n"));
    assert_eq!(report["pass"], true, "{stdout}");
    assert!(out.status.success(), "the drill exited {}: {stdout}", out.status);
    assert!(report["legit"].as_array().unwrap().len() > 10, "{text}");
    eprintln!("{stdout}");
}
