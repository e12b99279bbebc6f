//! Watching the config file and the TLS files it names. Polling metadata
//! once a second is enough for files like these, survives editors,
//! cert-manager and Kubernetes replacing files by rename (a new inode), and
//! needs no platform watcher.

use std::path::{Path, PathBuf};
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

/// The config file and the TLS files it names.
fn watched(app: &App, config: &Path) -> Vec<PathBuf> {
    let mut paths = vec![config.to_path_buf()];
    if let Some(tls) = &app.runtime().config.tls {
        paths.extend(tls.files().map(Path::to_path_buf));
    }
    paths
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<Stamp>> {
    paths.iter().map(|p| stamp(p)).collect()
}

/// Reloads `app` whenever the config file (or a certificate or key it
/// names) changes, until `stop` flips.
pub async fn watch(app: Arc<App>, path: PathBuf, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut paths = watched(&app, &path);
    let mut seen = stamps(&paths);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
        if stamps(&paths) == seen {
            continue;
        }
        // Debounce: wait until the files stop changing (a renewal writes
        // certificate and key one after the other).
        let mut settled = stamps(&paths);
        loop {
            tokio::time::sleep(SETTLE).await;
            let again = stamps(&paths);
            if again == settled {
                break;
            }
            settled = again;
        }
        if settled[0].is_none() {
            tracing::warn!(file = %path.display(), "config file is gone; keeping the config in force");
            seen = settled;
            continue;
        }
        tracing::info!(file = %path.display(), "config or certificate changed");
        // Errors are logged and counted by reload itself.
        let _ = app.reload().await;
        // The reloaded config may name other certificate files.
        paths = watched(&app, &path);
        seen = stamps(&paths);
    }
}
