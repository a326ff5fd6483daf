//! Watches a folder for changes (notify) and turns bursts of events into one
//! "scan now" signal after the burst settles, with an early hint naming the
//! changed files once the burst pauses (see [`Watched`]).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{Config, EventKind, EventKindMask, RecursiveMode, Watcher};
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

/// What the watcher tells the folder task.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    /// The burst has paused for [`SETTLE`]: these files changed in it (a
    /// burst naming more than [`HINT_PATHS`] gives none). Once per burst;
    /// the folder task may hash them while the debounce runs on.
    Paused(Vec<PathBuf>),
    /// Something changed and the burst has been quiet for the debounce:
    /// scan now. `after_hint`: the burst went on after its hint, so what was
    /// hashed for the hint may be out of date (a rewrite within the same
    /// mtime tick keeps size and mtime) and must not be used.
    Changed {
        /// Events came after the hint.
        after_hint: bool,
    },
}

/// The pause after which a burst's files are named ([`Watched::Paused`]): a
/// program saving a file is done with it by then far more often than not.
pub const SETTLE: Duration = Duration::from_millis(20);

/// Most files one hint names.
pub const HINT_PATHS: usize = 16;

/// Moves out of our own files remembered at once (their cookies): far more
/// than the renames in flight between the kernel's two halves of one.
const PLACED_COOKIES: usize = 64;

/// The paths a pull moves in the step that commits their index record: the
/// temp file it renames into place, and the file that one replaces (or a
/// remote delete removes), which it moves into the history first. The
/// watcher does not count those moves as changes. Only these: the agent's
/// other renames out of temp files (a restore `--to` a path inside a
/// folder, `ferry recover --into`) and a user's rename of a leftover temp
/// file are not recorded, and count.
#[derive(Clone, Default)]
pub struct Placing(Arc<Mutex<HashMap<PathBuf, Option<Instant>>>>);

/// How long a placement stays known after its pull step ends: the watcher
/// reads the kernel's events a little later, more so on a busy machine.
const LINGER: Duration = Duration::from_secs(5);

impl Placing {
    /// Registers `path` while the returned guard lives (and [`LINGER`] after).
    pub fn start(&self, path: &Path) -> PlacingGuard {
        let mut m = self.lock();
        m.retain(|_, released| live(*released));
        m.insert(path.to_path_buf(), None);
        PlacingGuard {
            placing: self.clone(),
            path: path.to_path_buf(),
        }
    }

    /// Whether `path` is being moved by a pull; a move is seen once.
    fn take(&self, path: &Path) -> bool {
        let mut m = self.lock();
        let placed = m.get(path).is_some_and(|released| live(*released));
        if placed {
            m.remove(path);
        }
        placed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Option<Instant>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether a placement still counts: its pull step is under way, or ended
/// less than [`LINGER`] ago.
fn live(released: Option<Instant>) -> bool {
    released.is_none_or(|t| t.elapsed() < LINGER)
}

/// Keeps a path registered in [`Placing`] while it lives.
pub struct PlacingGuard {
    placing: Placing,
    path: PathBuf,
}

impl PlacingGuard {
    /// Forgets the path at once, for a step that failed: nothing was
    /// recorded, so a later move of the path (a user's) is a change, and so
    /// is one the step made before it failed, unless already seen.
    pub fn cancel(self) {
        self.placing.lock().remove(&self.path);
    }
}

impl Drop for PlacingGuard {
    fn drop(&mut self) {
        if let Some(released) = self.placing.lock().get_mut(&self.path) {
            *released = Some(Instant::now());
        }
    }
}

/// Starts watching `root` recursively. The returned channel gives
/// [`Watched::Changed`] when something changed and the burst has been quiet
/// for `debounce_ms`, and before that, once per burst, [`Watched::Paused`]
/// with the files written or moved in (when the debounce is longer than
/// [`SETTLE`]). The watcher stops when the returned handle is dropped.
pub fn watch(
    root: &Path,
    debounce_ms: u64,
    placing: Placing,
) -> Result<(notify::RecommendedWatcher, mpsc::Receiver<Watched>), WatchError> {
    // Each relevant event, with the file it wrote or moved in, if any.
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<Option<PathBuf>>();
    let marker = marker_dir(root);
    let ours = move |p: &Path| {
        p.starts_with(&marker)
            || p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX))
    };
    // Rename cookies of moves out of the temp files a pull is placing (see
    // `Placing`): its index record is committed with the rename, so a scan
    // would find nothing. Without this, the watcher rescanned the whole
    // folder every debounce all through an initial sync, stat-ing every file
    // placed so far and holding the folder's disk lock (which the pull's
    // placements wait for).
    let mut placed: VecDeque<usize> = VecDeque::with_capacity(PLACED_COOKIES);
    let handler = move |res: notify::Result<notify::Event>| {
        let relevant = match &res {
            // Opening or reading a file changes nothing (and the scanner's own
            // walk opens every directory: counting those would rescan forever).
            // The kernel is not asked for these (below); a backend that
            // filters in user space may still pass one. Closing a file opened
            // for writing counts: a write through a memory map gives no other
            // event.
            Ok(ev)
                if matches!(ev.kind, EventKind::Access(a)
                    if a != AccessKind::Close(AccessMode::Write)) =>
            {
                false
            }
            // A pull placing a file (or setting aside the one it replaces):
            // remember the move's cookie; its other halves (the destination,
            // and the pair) carry the same one.
            Ok(ev)
                if matches!(
                    ev.kind,
                    EventKind::Modify(ModifyKind::Name(RenameMode::From))
                ) =>
            {
                if let Some(cookie) = ev.tracker()
                    && let [from] = &ev.paths[..]
                    && placing.take(from)
                {
                    if placed.len() == PLACED_COOKIES {
                        placed.pop_front();
                    }
                    placed.push_back(cookie);
                    false
                } else {
                    true
                }
            }
            Ok(ev)
                if matches!(ev.kind, EventKind::Modify(ModifyKind::Name(_)))
                    && ev.tracker().is_some_and(|c| placed.contains(&c)) =>
            {
                false
            }
            // Our own versions live under the marker, and pulls assemble in
            // `.ferry-tmp-*` files.
            Ok(ev) => ev.need_rescan() || ev.paths.iter().any(|p| !ours(p)),
            Err(_) => true,
        };
        if relevant {
            // The file a write or a move in left behind, for the hint.
            let written = match &res {
                Ok(ev)
                    if matches!(
                        ev.kind,
                        EventKind::Create(_)
                            | EventKind::Modify(ModifyKind::Data(_))
                            | EventKind::Modify(ModifyKind::Any)
                            | EventKind::Modify(ModifyKind::Name(
                                RenameMode::To | RenameMode::Both
                            ))
                            | EventKind::Access(AccessKind::Close(AccessMode::Write))
                    ) =>
                {
                    ev.paths.last().filter(|p| !ours(p)).cloned()
                }
                _ => None,
            };
            let _ = raw_tx.send(written);
        }
    };
    // Changes and closes after writing only: by default inotify also queues
    // an event for every open, and serving a large file to a peer opens it
    // once per chunk (about 13,000 wake-ups of the watcher thread per GiB,
    // each stealing a core from the transfer, and a risk of overflowing the
    // kernel's queue).
    // And a symlink to a directory is a link, not part of the folder: notify
    // would otherwise watch the tree it points to (all of `/`, for a link
    // there), using up the watch limit on changes that are not ours.
    let config = Config::default()
        .with_event_kinds(EventKindMask::CORE | EventKindMask::ACCESS_CLOSE)
        .with_follow_symlinks(false);
    let mut watcher =
        notify::RecommendedWatcher::new(handler, config).map_err(|e| to_error(root, e))?;
    watcher
        .watch(root, RecursiveMode::Recursive)
        .map_err(|e| to_error(root, e))?;

    let (tx, rx) = mpsc::channel(2);
    let debounce = Duration::from_millis(debounce_ms);
    tokio::spawn(async move {
        while let Some(first) = raw_rx.recv().await {
            // Wait until the burst is quiet, but not forever while it goes on;
            // name its files once it first pauses for SETTLE.
            let start = tokio::time::Instant::now();
            let mut last = start;
            let mut paths: Option<Vec<PathBuf>> = Some(Vec::new());
            let note = |paths: &mut Option<Vec<PathBuf>>, p: Option<PathBuf>| {
                if let (Some(list), Some(p)) = (paths.as_mut(), p)
                    && !list.contains(&p)
                {
                    list.push(p);
                    if list.len() > HINT_PATHS {
                        *paths = None;
                    }
                }
            };
            note(&mut paths, first);
            let mut hinted = debounce <= SETTLE;
            let mut sent_hint = false;
            let mut after_hint = false;
            loop {
                let wait = if hinted { debounce } else { SETTLE };
                let quiet_until = last + wait;
                match tokio::time::timeout_at(quiet_until, raw_rx.recv()).await {
                    Ok(Some(p)) => {
                        after_hint |= sent_hint;
                        note(&mut paths, p);
                        last = tokio::time::Instant::now();
                        if last - start < debounce * 10 {
                            continue;
                        }
                        break;
                    }
                    Ok(None) => return,
                    Err(_) if !hinted => {
                        hinted = true;
                        if let Some(list) = paths.take().filter(|l| !l.is_empty()) {
                            // A hint only: dropped when the task is behind.
                            sent_hint = tx.try_send(Watched::Paused(list)).is_ok();
                        }
                    }
                    Err(_) => break,
                }
            }
            if tx.send(Watched::Changed { after_hint }).await.is_err() {
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

    /// Whether no signal (not even a hint) comes for 600 ms.
    async fn quiet(rx: &mut mpsc::Receiver<Watched>) -> bool {
        tokio::time::timeout(Duration::from_millis(600), rx.recv())
            .await
            .is_err()
    }

    /// Whether a scan signal comes within 10 s (past any hint before it).
    async fn changed(rx: &mut mpsc::Receiver<Watched>) -> bool {
        let next = async {
            loop {
                match rx.recv().await {
                    Some(Watched::Paused(_)) => continue,
                    other => return other,
                }
            }
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(10), next).await,
            Ok(Some(Watched::Changed { .. }))
        )
    }

    #[tokio::test]
    async fn reading_files_and_listing_directories_is_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(marker_dir(dir.path())).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), b"x").unwrap();
        let (_w, mut rx) = watch(dir.path(), 100, Placing::default()).unwrap();
        for _ in 0..5 {
            let _ = std::fs::read_dir(dir.path()).unwrap().count();
            let _ = std::fs::read_dir(dir.path().join("sub")).unwrap().count();
            let _ = std::fs::read(dir.path().join("sub/f")).unwrap();
        }
        assert!(quiet(&mut rx).await, "reads woke the folder");
    }

    #[tokio::test]
    async fn a_write_through_a_memory_map_is_noticed_when_the_file_closes() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(marker_dir(dir.path())).unwrap();
        let path = dir.path().join("mapped");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let (_w, mut rx) = watch(dir.path(), 100, Placing::default()).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // SAFETY: a shared mapping of the file's first 4 KiB, written once and
        // unmapped before the file closes.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            *(p as *mut u8) = 7;
            assert_eq!(libc::munmap(p, 4096), 0);
        }
        drop(f);
        assert!(changed(&mut rx).await, "the mapped write was not noticed");
        assert_eq!(std::fs::read(&path).unwrap()[0], 7);
    }

    #[tokio::test]
    async fn a_pull_placing_a_file_is_not_a_change_but_other_renames_are() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(marker_dir(dir.path())).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let placing = Placing::default();
        let (_w, mut rx) = watch(dir.path(), 100, placing.clone()).unwrap();
        let tmp = |n: &str| dir.path().join(format!("sub/{TEMP_PREFIX}{n}.part"));
        // What a pull does (its temp file's writes are not changes either).
        for n in 0..20 {
            std::fs::write(tmp(&n.to_string()), b"pulled").unwrap();
            let _placing = placing.start(&tmp(&n.to_string()));
            std::fs::rename(tmp(&n.to_string()), dir.path().join(format!("sub/f{n}"))).unwrap();
        }
        assert!(quiet(&mut rx).await, "placing pulled files woke the folder");
        // A pull replacing them: each old version is moved into the history,
        // then the new one placed.
        let versions = marker_dir(dir.path()).join("versions");
        std::fs::create_dir_all(&versions).unwrap();
        for n in 0..20 {
            let (t, target) = (tmp(&n.to_string()), dir.path().join(format!("sub/f{n}")));
            std::fs::write(&t, b"pulled, second version").unwrap();
            let _placing = placing.start(&t);
            let _setting_aside = placing.start(&target);
            std::fs::rename(&target, versions.join(n.to_string())).unwrap();
            std::fs::rename(&t, &target).unwrap();
        }
        assert!(
            quiet(&mut rx).await,
            "replacing pulled files woke the folder"
        );
        // A pull step that failed before it moved anything: a user's rename
        // of the same path right after is a change (a registration left to
        // linger would have hidden it).
        placing.start(&dir.path().join("sub/f3")).cancel();
        std::fs::rename(dir.path().join("sub/f3"), dir.path().join("sub/g3")).unwrap();
        assert!(
            changed(&mut rx).await,
            "a rename after a failed step was missed"
        );
        assert!(quiet(&mut rx).await);
        // A user moving a file into the marker directory is not the agent.
        std::fs::rename(dir.path().join("sub/f19"), versions.join("mine")).unwrap();
        assert!(changed(&mut rx).await, "a file moved away was missed");
        assert!(quiet(&mut rx).await);

        // A temp file renamed into the folder by anything else (a restore
        // `--to` a path here, a user tidying up): nothing recorded it.
        std::fs::write(tmp("restored"), b"old bytes").unwrap();
        std::fs::rename(tmp("restored"), dir.path().join("sub/restored")).unwrap();
        assert!(changed(&mut rx).await, "an unrecorded placement was missed");
        assert!(quiet(&mut rx).await);
        // A user's rename inside the folder, and a move in from outside it.
        std::fs::rename(dir.path().join("sub/f0"), dir.path().join("sub/g0")).unwrap();
        assert!(changed(&mut rx).await, "a rename was missed");
        assert!(quiet(&mut rx).await);
        let from = outside.path().join("brought");
        std::fs::write(&from, b"x").unwrap();
        std::fs::rename(&from, dir.path().join("sub/brought")).unwrap();
        assert!(changed(&mut rx).await, "a move into the folder was missed");
        assert!(quiet(&mut rx).await);
        // A pull's placement, then a user's edit of the same file.
        std::fs::write(tmp("x"), b"pulled again").unwrap();
        {
            let _placing = placing.start(&tmp("x"));
            std::fs::rename(tmp("x"), dir.path().join("sub/f1")).unwrap();
        }
        std::fs::write(dir.path().join("sub/f1"), b"edited").unwrap();
        assert!(
            changed(&mut rx).await,
            "an edit after a placement was missed"
        );
    }

    #[tokio::test]
    async fn changes_behind_a_symlinked_directory_are_not_watched() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(marker_dir(dir.path())).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let (_w, mut rx) = watch(dir.path(), 100, Placing::default()).unwrap();
        std::fs::write(outside.path().join("elsewhere"), b"x").unwrap();
        assert!(
            quiet(&mut rx).await,
            "a write outside the folder, behind a link, woke it"
        );
        // The link itself is watched as an entry of the folder.
        std::fs::remove_file(dir.path().join("link")).unwrap();
        assert!(changed(&mut rx).await);
    }

    #[tokio::test]
    async fn a_burst_of_writes_gives_one_signal_and_marker_writes_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(marker_dir(dir.path())).unwrap();
        let (_w, mut rx) = watch(dir.path(), 100, Placing::default()).unwrap();
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
        assert!(changed(&mut rx).await);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), rx.recv())
                .await
                .is_err(),
            "one burst gave two signals"
        );
    }

    #[tokio::test]
    async fn a_pause_names_the_files_written_or_moved_in_before_the_scan_signal() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(marker_dir(dir.path())).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let (_w, mut rx) = watch(dir.path(), 1000, Placing::default()).unwrap();
        // A file written, then one moved in (as editors save), each a burst.
        let written = dir.path().join("sub/written");
        let brought = outside.path().join("new");
        std::fs::write(&brought, b"saved elsewhere").unwrap();
        let moved = dir.path().join("moved-in");
        for (path, make) in [
            (
                &written,
                Box::new(|| std::fs::write(&written, b"saved").unwrap()) as Box<dyn Fn()>,
            ),
            (
                &moved,
                Box::new(|| std::fs::rename(&brought, &moved).unwrap()),
            ),
        ] {
            make();
            let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            let Ok(Some(Watched::Paused(paths))) = first else {
                panic!("no hint before the scan signal: {first:?}");
            };
            assert_eq!(&paths, std::slice::from_ref(path));
            let next = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            assert_eq!(
                next.ok().flatten(),
                Some(Watched::Changed { after_hint: false })
            );
            assert!(quiet(&mut rx).await, "one burst gave a second signal");
        }

        // Written again after its hint, within the debounce: the scan signal
        // says what was hashed for the hint may be out of date.
        std::fs::write(&written, b"saved, v2").unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert!(matches!(first, Ok(Some(Watched::Paused(_)))), "{first:?}");
        std::fs::write(&written, b"saved, v3").unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(
            next.ok().flatten(),
            Some(Watched::Changed { after_hint: true })
        );
        assert!(quiet(&mut rx).await);

        // More files than a hint names: the scan signal alone.
        for i in 0..(HINT_PATHS + 5) {
            std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
        }
        let mut hinted = Vec::new();
        let last = loop {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(Watched::Paused(p))) => hinted.extend(p),
                other => break other,
            }
        };
        assert!(
            matches!(last, Ok(Some(Watched::Changed { .. }))),
            "{last:?}"
        );
        assert!(hinted.len() <= HINT_PATHS, "{hinted:?}");

        // A debounce no longer than the pause: no hints at all.
        let (_w2, mut rx2) =
            watch(dir.path(), SETTLE.as_millis() as u64, Placing::default()).unwrap();
        std::fs::write(&written, b"saved again").unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), rx2.recv()).await;
        assert_eq!(
            got.ok().flatten(),
            Some(Watched::Changed { after_hint: false })
        );
    }
}
