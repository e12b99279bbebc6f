//! What the files Palisade writes give away to other users of the host,
//! and what a file planted next to them can make it do.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use palisade_store::{StateLog, write_atomically};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-files-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn atomic_writes_are_private_and_never_follow_a_planted_temp_file() {
    let dir = scratch("atomic");
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    // The temp names a writer to this directory could predict (the old
    // scheme was `.<name>.tmp.<pid>`), each a symlink to the victim.
    let target = dir.join("bans.json");
    std::os::unix::fs::symlink(
        &victim,
        dir.join(format!(".bans.json.tmp.{}", std::process::id())),
    )
    .unwrap();
    write_atomically(&target, b"[]").unwrap();
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious",
        "a planted symlink was followed"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"[]");
    assert_eq!(mode(&target), 0o600, "readable by others");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_state_log_and_its_snapshot_are_private() {
    let dir = scratch("wal");
    let (mut log, _) = StateLog::open(&dir, 1000, 1_000).unwrap();
    log.compact(1_000).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{} is readable by others", p.display());
    }
    assert!(std::fs::read_dir(&dir).unwrap().count() >= 2);
    let _ = std::fs::remove_dir_all(&dir);
}
