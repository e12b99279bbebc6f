//! Watching the config file. Polling the file's metadata once a second is
//! enough for a config file, survives editors and Kubernetes replacing the
//! file by rename (a new inode), and needs no platform watcher.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::proxy::App;

/// What identifies a version of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode,
    })
}

/// How often the file is looked at.
const POLL: Duration = Duration::from_secs(1);
/// A change must hold still this long before it is read (editors write in steps).
const SETTLE: Duration = Duration::from_millis(300);

/// Reloads `app` whenever `path` changes, until `stop` flips.
pub async fn watch(app: Arc<App>, path: PathBuf, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut seen = stamp(&path);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        // Debounce: wait until the file stops changing.
        let mut settled = now;
        loop {
            tokio::time::sleep(SETTLE).await;
            let again = stamp(&path);
            if again == settled {
                break;
            }
            settled = again;
        }
        seen = settled;
        if seen.is_none() {
            tracing::warn!(file = %path.display(), "config file is gone; keeping the config in force");
            continue;
        }
        tracing::info!(file = %path.display(), "config file changed");
        // Errors are logged and counted by reload itself.
        let _ = app.reload().await;
    }
}
