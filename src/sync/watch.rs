//! Watches a folder for changes (notify) and turns bursts of events into one
//! "scan now" signal after the burst settles.

use std::path::Path;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::folder::marker_dir;
use crate::relpath::TEMP_PREFIX;

/// Why a folder cannot be watched (the agent then scans it periodically).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The kernel's inotify limits ran out.
    #[error(
        "cannot watch {path}: the system's inotify watch limit is reached \
         (fs.inotify.max_user_watches, or fs.inotify.max_user_instances); raise it with \
         `sudo sysctl fs.inotify.max_user_watches=524288` (and in /etc/sysctl.d to keep it); \
         scanning every 10 s until then"
    )]
    Limit {
        /// The folder root.
        path: String,
    },
    /// Any other watcher failure.
    #[error("cannot watch {path}: {message}")]
    Other {
        /// The folder root.
        path: String,
        /// What failed.
        message: String,
    },
}

/// Starts watching `root` recursively. Each message on the returned channel
/// means "something changed; the burst has been quiet for `debounce_ms`". The
/// watcher stops when the returned handle is dropped.
pub fn watch(
    root: &Path,
    debounce_ms: u64,
) -> Result<(notify::RecommendedWatcher, mpsc::Receiver<()>), WatchError> {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let marker = marker_dir(root);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let relevant = match &res {
            // Opening or reading a file changes nothing (and the scanner's own
            // walk opens every directory: counting those would rescan forever).
            Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_)) => false,
            // Our own versions live under the marker, and pulls assemble in
            // `.ferry-tmp-*` files (renaming one into place still counts, by
            // its target).
            Ok(ev) => {
                ev.need_rescan()
                    || ev.paths.iter().any(|p| {
                        !p.starts_with(&marker)
                            && !p
                                .file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX))
                    })
            }
            Err(_) => true,
        };
        if relevant {
            let _ = raw_tx.send(());
        }
    })
    .map_err(|e| to_error(root, e))?;
    watcher
        .watch(root, RecursiveMode::Recursive)
        .map_err(|e| to_error(root, e))?;

    let (tx, rx) = mpsc::channel(1);
    let debounce = Duration::from_millis(debounce_ms);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Wait until the burst is quiet, but not forever while it goes on.
            let start = tokio::time::Instant::now();
            loop {
                match tokio::time::timeout(debounce, raw_rx.recv()).await {
                    Ok(Some(())) if start.elapsed() < debounce * 10 => continue,
                    Ok(None) => return,
                    _ => break,
                }
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok((watcher, rx))
}

fn to_error(root: &Path, e: notify::Error) -> WatchError {
    let path = root.display().to_string();
    match e.kind {
        notify::ErrorKind::MaxFilesWatch => WatchError::Limit { path },
        notify::ErrorKind::Io(ref io) if io.raw_os_error() == Some(libc::ENOSPC) => {
            WatchError::Limit { path }
        }
        _ => WatchError::Other {
            path,
            message: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reading_files_and_listing_directories_is_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(marker_dir(dir.path())).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), b"x").unwrap();
        let (_w, mut rx) = watch(dir.path(), 100).unwrap();
        for _ in 0..5 {
            let _ = std::fs::read_dir(dir.path()).unwrap().count();
            let _ = std::fs::read_dir(dir.path().join("sub")).unwrap().count();
            let _ = std::fs::read(dir.path().join("sub/f")).unwrap();
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(600), rx.recv())
                .await
                .is_err(),
            "reads woke the folder"
        );
    }

    #[tokio::test]
    async fn a_burst_of_writes_gives_one_signal_and_marker_writes_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(marker_dir(dir.path())).unwrap();
        let (_w, mut rx) = watch(dir.path(), 100).unwrap();
        std::fs::write(marker_dir(dir.path()).join("tmp"), b"x").unwrap();
        std::fs::write(dir.path().join(format!("{TEMP_PREFIX}x.part")), b"x").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(500), rx.recv())
                .await
                .is_err(),
            "a write under the marker or to a temp file woke the folder"
        );
        for i in 0..20 {
            std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
        }
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(got.unwrap(), Some(()));
        assert!(
            tokio::time::timeout(Duration::from_millis(500), rx.recv())
                .await
                .is_err(),
            "one burst gave two signals"
        );
    }
}
