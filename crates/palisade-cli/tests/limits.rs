//! Limits as users write them, through a running `palisade` and curl: a
//! login route at 5 a minute.
#![allow(clippy::unwrap_used)]

use std::process::Command;

mod common;
use common::start;

/// Six GETs of a 5-a-minute route on one curl connection: five
/// pass, the sixth is refused for the rest of the 12 s one request takes to
/// drip back (a host stalled for 12 s between them would let it pass).
#[test]
fn a_login_route_at_five_a_minute_refuses_the_sixth_with_its_retry_after() {
    let dir = common::temp_dir("limits", "login");
    let d = start(
        &dir,
        "[[routes]]\nname = \"login\"\npath_prefix = \"/status\"\nrate = \"5/m\"\n",
    );
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "30", "-w"])
        .arg("%{http_code} %header{retry-after} %header{ratelimit-policy}\\n")
        .arg(format!("http://{}/status/200?[1-6]", d.proxy))
        .output()
        .expect("curl must be installed");
    assert!(out.status.success(), "curl failed: {out:?}");
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    for l in &lines[..5] {
        assert!(l.starts_with("200 "), "{lines:?}");
    }
    let refused: Vec<&str> = lines[5].split(' ').collect();
    assert_eq!(refused[0], "429", "{lines:?}");
    let retry: u64 = refused[1].parse().unwrap();
    assert!((1..=12).contains(&retry), "retry-after {retry}");
    assert_eq!(refused[2], "\"login\";q=5;w=60");
}
