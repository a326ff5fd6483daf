//! Deciding what to pull (version vectors), and putting remote versions in
//! place: chunks copied from local files where possible and fetched from peers
//! otherwise, assembled in a temp file beside its target, fsynced,
//! verified against the whole-file hash, and renamed into place, with the
//! version it replaces kept in the history (its row reserved and committed
//! before anything moves) and the index updated in the transaction that
//! moves it.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use iroh::endpoint::Connection;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::conflict::{conflict_path, wins};
use super::gather::Gather;
use super::link::{FetchError, fetch_chunk, fetch_groups, read_verified};
use super::verifier::{Marker, Verifier};
use super::{Engine, FolderActivity, FolderHandle, NeedItem};
use crate::chunking::{ChunkHash, ChunkInfo, FileHash, group_hash, group_ranges};
use crate::device::{DeviceId, ShortId};
use crate::disk::{
    WRITEBACK_EVERY, copy_range, hash_file, mtime_ns, start_writeback, sync_dir, system_time,
};
use crate::folder::{check_root, marker_dir};
use crate::index::{
    FileKind, FileMeta, Folder, Index, LocalFile, Pulled, RemoteFile, SharedIndex, Superseded,
};
use crate::relpath::{RelPath, TEMP_PREFIX};
use crate::version_vector::{Relation, VersionVector};

/// Most needed items listed in the folder status.
const MAX_LISTED: usize = 500;

/// How a pull pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    /// Everything needed is in place (or nothing can be done until peers
    /// announce more).
    #[default]
    Done,
    /// A local file changed under the pull: scan first, then decide again.
    Rescan,
    /// Some items could not be pulled now (no peer has them online, a link
    /// failed): try again later.
    Retry,
}

/// One thing to do for a path.
#[derive(Debug, Clone)]
enum Action {
    /// Put `remote` in place and record it with `version`. With `conflict`,
    /// the local file is first moved to that path (it lost to `remote`).
    Take {
        remote: Box<RemoteFile>,
        sources: Vec<DeviceId>,
        local: Option<Box<LocalFile>>,
        version: VersionVector,
        conflict: Option<(RelPath, DeviceId)>,
    },
    /// Same content reached concurrently: merge the versions, copy nothing
    /// (if the local record is still at sequence `seen`).
    Merge {
        path: RelPath,
        seen: u64,
        version: VersionVector,
    },
    /// The local version won a conflict: record it; the losing device keeps
    /// the other version as a conflict copy and syncs it.
    Won {
        path: RelPath,
        copy: RelPath,
        local: VersionVector,
        remote: VersionVector,
        device: DeviceId,
    },
}

/// Why one item could not be pulled.
#[derive(Debug, thiserror::Error)]
enum PullError {
    #[error("the local file changed since the last scan; scanning it first")]
    LocalChanged,
    #[error("no connected device has this version")]
    NoSource,
    #[error("{0}")]
    Fetch(String),
    #[error("the assembled file does not match its hash")]
    HashMismatch,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Index(#[from] crate::index::IndexError),
    #[error("unsafe path: {0}")]
    Unsafe(String),
    /// Checked before anything is fetched, so a record claiming a huge size
    /// cannot fill the disk.
    #[error(
        "No space left on device: the file needs {need} bytes, the folder's filesystem has {free} free"
    )]
    NoSpace { need: u64, free: u64 },
}

impl PullError {
    fn outcome(&self) -> Outcome {
        match self {
            PullError::LocalChanged => Outcome::Rescan,
            _ => Outcome::Retry,
        }
    }

    /// Whether the pull's temp file stays for a resume. Not when the pull
    /// was refused (a local file changed or appeared in its way, an unsafe
    /// path): the next pass decides afresh.
    fn keeps_temp(&self) -> bool {
        !matches!(self, PullError::LocalChanged | PullError::Unsafe(_))
    }
}

/// Decides what is needed from the records peers announced. With `revert`
/// (a receive-only folder's `ferry revert`), local changes made by this device
/// are undone: the synced version is taken back, and files only this device
/// has are removed (kept in the history).
fn plan(
    local: &HashMap<String, LocalFile>,
    remote: Vec<(DeviceId, RemoteFile)>,
    revert: Option<ShortId>,
) -> Vec<Action> {
    let mut by_path: HashMap<String, Vec<(DeviceId, RemoteFile)>> = HashMap::new();
    for (d, r) in remote {
        by_path
            .entry(r.path.as_str().to_owned())
            .or_default()
            .push((d, r));
    }
    let empty = VersionVector::new();
    let mut actions = Vec::new();
    if let Some(me) = revert {
        for (path, l) in local {
            if l.record.modified_by != me || l.record.deleted {
                continue;
            }
            if !by_path.contains_key(path) {
                let mut gone = l.record.clone();
                gone.deleted = true;
                actions.push(Action::Take {
                    version: gone.version.clone(),
                    remote: Box::new(gone),
                    sources: Vec::new(),
                    local: Some(Box::new(l.clone())),
                    conflict: None,
                });
            }
        }
    }
    for (path, remotes) in by_path {
        if let Some(me) = revert
            && let Some(l) = local.get(&path)
            && l.record.modified_by == me
        {
            // Take the newest remote version back, whatever the vectors say.
            let mut best = &remotes[0].1;
            for (_, r) in &remotes[1..] {
                if r.version.compare(&best.version) == Relation::Newer
                    || (r.version.compare(&best.version) == Relation::Concurrent && wins(r, best))
                {
                    best = r;
                }
            }
            actions.push(Action::Take {
                remote: Box::new(best.clone()),
                sources: remotes
                    .iter()
                    .filter(|(_, r)| r.version == best.version)
                    .map(|(d, _)| *d)
                    .collect(),
                local: Some(Box::new(l.clone())),
                version: best.version.clone(),
                conflict: None,
            });
            continue;
        }
        let l = local.get(&path);
        let lv = l.map_or(&empty, |l| &l.record.version);
        let mut best: Option<&RemoteFile> = None;
        for (_, r) in &remotes {
            if matches!(r.version.compare(lv), Relation::Equal | Relation::Older) {
                continue;
            }
            best = Some(match best {
                None => r,
                Some(b) => match r.version.compare(&b.version) {
                    Relation::Newer => r,
                    Relation::Concurrent if wins(r, b) => r,
                    _ => b,
                },
            });
        }
        let Some(best) = best else { continue };
        let sources: Vec<DeviceId> = remotes
            .iter()
            .filter(|(_, r)| r.version == best.version)
            .map(|(d, _)| *d)
            .collect();
        let device = sources[0];
        match best.version.compare(lv) {
            Relation::Newer => {
                // A delete of something never seen here needs no disk change,
                // but is recorded so the versions agree.
                actions.push(Action::Take {
                    remote: Box::new(best.clone()),
                    sources,
                    local: l.cloned().map(Box::new),
                    version: best.version.clone(),
                    conflict: None,
                });
            }
            Relation::Concurrent => {
                let l = l.expect("concurrent with an empty version means a local record");
                let merged = lv.clone().merged(&best.version);
                if l.record.same_content(best) {
                    // The same content, but perhaps other metadata: the version
                    // that wins a conflict gives its mtime and permissions, so
                    // every device ends up with the same file.
                    if !best.deleted
                        && best.kind == FileKind::File
                        && (best.mtime_ns != l.record.mtime_ns
                            || best.permissions != l.record.permissions)
                        && wins(best, &l.record)
                    {
                        actions.push(Action::Take {
                            remote: Box::new(best.clone()),
                            sources,
                            local: Some(Box::new(l.clone())),
                            version: merged,
                            conflict: None,
                        });
                        continue;
                    }
                    actions.push(Action::Merge {
                        path: l.record.path.clone(),
                        seen: l.record.sequence,
                        version: merged,
                    });
                } else if wins(best, &l.record) {
                    let copy = (!l.record.deleted && l.record.kind == FileKind::File)
                        .then(|| (conflict_path(&l.record.path, &l.record), device));
                    actions.push(Action::Take {
                        remote: Box::new(best.clone()),
                        sources,
                        local: Some(Box::new(l.clone())),
                        version: merged,
                        conflict: copy,
                    });
                } else if !best.deleted && best.kind == FileKind::File {
                    actions.push(Action::Won {
                        path: l.record.path.clone(),
                        copy: conflict_path(&l.record.path, best),
                        local: lv.clone(),
                        remote: best.version.clone(),
                        device,
                    });
                }
            }
            Relation::Equal | Relation::Older => {}
        }
    }
    actions
}

/// Which differences between names a folder's filesystem does not see.
#[derive(Debug, Clone, Copy)]
struct Folding {
    /// Case (`Report.txt` is `report.txt`).
    case: bool,
    /// Unicode normalisation (`café` in NFC is `café` in NFD), as on macOS.
    unicode: bool,
}

impl Folding {
    /// The name as this filesystem sees it.
    fn key(self, p: &str) -> String {
        use unicode_normalization::UnicodeNormalization;
        let p: String = if self.unicode {
            p.nfc().collect()
        } else {
            p.to_owned()
        };
        if self.case { p.to_lowercase() } else { p }
    }
}

/// On a filesystem that ignores case or Unicode normalisation in names, a new
/// path that differs only so from one already here would overwrite it: such
/// items are not pulled but reported (as Syncthing does).
fn split_name_clashes(
    local: &HashMap<String, LocalFile>,
    actions: Vec<Action>,
    fold: Folding,
) -> (Vec<Action>, Vec<NeedItem>) {
    use unicode_normalization::UnicodeNormalization;
    let mut folded: HashMap<String, String> = local
        .values()
        .filter(|l| !l.record.deleted)
        .map(|l| {
            let p = l.record.path.as_str();
            (fold.key(p), p.to_owned())
        })
        .collect();
    let mut ok = Vec::with_capacity(actions.len());
    let mut bad = Vec::new();
    for a in actions {
        if let Action::Take { remote, .. } = &a
            && !remote.deleted
        {
            let p = remote.path.as_str();
            let key = fold.key(p);
            match folded.get(&key) {
                Some(other) if other != p => {
                    let reason = if other.nfc().eq(p.nfc()) {
                        format!(
                            "unicode normalisation conflict: the same name as {other} in another Unicode form (NFC/NFD), which this filesystem cannot tell apart"
                        )
                    } else {
                        format!(
                            "case conflict: differs only by case from {other}, which this filesystem cannot tell apart"
                        )
                    };
                    bad.push(NeedItem {
                        path: p.to_owned(),
                        size: remote.size,
                        reason,
                    });
                    continue;
                }
                _ => {
                    folded.insert(key, p.to_owned());
                }
            }
        }
        ok.push(a);
    }
    (ok, bad)
}

/// Sorts actions into the order of work: directories parents first, then
/// files and links, then deletes children first.
fn order(actions: &mut [Action]) {
    actions.sort_by_key(stage);
    let first_delete = actions.partition_point(|a| stage(a).0 < 3);
    actions[first_delete..].reverse();
}

/// The stage of an action, and its path.
fn stage(a: &Action) -> (u8, String) {
    match a {
        Action::Merge { path, .. } | Action::Won { path, .. } => (0, path.as_str().to_owned()),
        Action::Take { remote, .. } if remote.deleted => (3, remote.path.as_str().to_owned()),
        Action::Take { remote, .. } if remote.kind == FileKind::Dir => {
            (1, remote.path.as_str().to_owned())
        }
        Action::Take { remote, .. } => (2, remote.path.as_str().to_owned()),
    }
}

/// One pull pass over a folder.
pub async fn pull_folder(engine: &Arc<Engine>, h: &Arc<FolderHandle>) -> Result<Outcome, String> {
    let revert = h
        .revert
        .swap(false, std::sync::atomic::Ordering::SeqCst)
        .then(|| engine.me.short());
    let folder = h.folder();
    if let Err(e) = check_root(&folder) {
        let mut st = h.status.lock().expect("status lock");
        st.state = FolderActivity::Error;
        st.error = Some(e.to_string());
        return Ok(Outcome::Done);
    }
    // No disk lock for the pass: scans go on while it fetches. Each batch of
    // placements takes it (`Committer`), and checks that the records it was
    // planned on are unchanged.
    let row = folder.row;
    let (local, remote) = engine
        .index
        .run(move |i| {
            Ok::<_, crate::index::IndexError>((i.local_files(row)?, i.remote_files(row)?))
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut actions = plan(&local, remote, revert);
    order(&mut actions);
    let mut clashes = Vec::new();
    if h.case_insensitive || h.normalizing {
        let fold = Folding {
            case: h.case_insensitive,
            unicode: h.normalizing,
        };
        let (ok, bad) = split_name_clashes(&local, actions, fold);
        actions = ok;
        clashes = bad;
    }

    if !Engine::receives(&folder) {
        set_need(
            h,
            needed(&actions, "send-only folder: remote changes are not applied"),
        );
        sweep_temps(h, &HashSet::new(), HashSet::new()).await;
        return Ok(Outcome::Done);
    }
    if actions.is_empty() {
        set_need(h, clashes);
        sweep_temps(h, &HashSet::new(), HashSet::new()).await;
        return Ok(Outcome::Done);
    }
    let _syncing = Syncing::start(h);
    set_need(h, needed(&actions, "pending"));

    let mut tally = Tally::default();
    // Read each pass, so a reloaded config applies from the next one.
    let sync_cfg = engine.sync_config();
    let files = Arc::new(Semaphore::new(sync_cfg.parallel_files));
    let small = Arc::new(Semaphore::new(sync_cfg.parallel_files * 8));
    let pass = Arc::new(Pass {
        requests: Arc::new(Semaphore::new(sync_cfg.requests_in_flight)),
        commits: Committer::start(engine.index.clone(), h.clone()),
        reads: Reads::start(engine.index.clone()),
        placing: h.placing.clone(),
    });
    let mut stage_no = 0;
    let mut set = tokio::task::JoinSet::new();
    for action in actions {
        let s = stage(&action).0;
        if s != stage_no {
            // Finish one stage before the next (parents before children).
            while let Some(r) = set.join_next().await {
                tally.add(r);
            }
            stage_no = s;
        }
        // Small files are mostly waiting (on the peer, on fsync): more of
        // them at once keeps both cores busy and the commit batches full.
        let pool = match &action {
            Action::Take { remote, .. } if remote.size <= SMALL_FILE => &small,
            _ => &files,
        };
        let permit = pool.clone().acquire_owned().await.expect("semaphore open");
        // Take in the pulls that finished meanwhile: a finished task keeps
        // its memory (a few KiB) until it is joined, and a folder can have
        // a great many files to pull in one stage.
        while let Some(r) = set.try_join_next() {
            tally.add(r);
        }
        let engine = engine.clone();
        let folder = folder.clone();
        let pass = pass.clone();
        set.spawn(async move {
            let _permit = permit;
            let (path, size, tmp) = match &action {
                Action::Take { remote, .. } => (
                    remote.path.clone(),
                    remote.size,
                    (!remote.deleted && remote.kind == FileKind::File)
                        .then(|| temp_path(&folder.path, remote, "part")),
                ),
                Action::Merge { path, .. } | Action::Won { path, .. } => (path.clone(), 0, None),
            };
            let r = apply(&engine, &folder, action, &pass).await;
            (path, size, r, tmp)
        });
    }
    while let Some(r) = set.join_next().await {
        tally.add(r);
    }
    let Tally {
        mut outcome,
        mut failed,
        changed,
        rescan,
        keep,
        discard,
    } = tally;
    sweep_temps(h, &keep, discard).await;
    if changed {
        engine.local_changed();
    }
    if rescan {
        // Conflict copies are new local files: let the scanner record them.
        h.scan_now.notify_one();
    }
    let any_failed = !failed.is_empty();
    failed.extend(clashes);
    set_need(h, failed);
    if any_failed && outcome == Outcome::Done {
        outcome = Outcome::Retry;
    }
    Ok(outcome)
}

/// A folder's state is "syncing" while this lives (a scan meanwhile shows
/// "scanning", and goes back to "syncing" when it ends).
struct Syncing<'a>(&'a FolderHandle);

impl<'a> Syncing<'a> {
    fn start(h: &'a FolderHandle) -> Self {
        h.pulling.store(true, std::sync::atomic::Ordering::SeqCst);
        h.set_state(FolderActivity::Syncing);
        Self(h)
    }
}

impl Drop for Syncing<'_> {
    fn drop(&mut self) {
        self.0
            .pulling
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let mut st = self.0.status.lock().expect("status lock");
        if st.state == FolderActivity::Syncing {
            st.state = FolderActivity::Idle;
        }
    }
}

/// What one applied action gives back: its path, size, result, and the temp
/// file a file pull assembles in.
type Applied = (RelPath, u64, Result<bool, PullError>, Option<PathBuf>);

/// Removes the temp files of earlier pulls that no pull of this pass failed
/// on (those stay for a resume): a version given up, replaced or deleted
/// meanwhile leaves none behind. Takes the folder's disk lock, so no scan
/// is listing them meanwhile.
async fn sweep_temps(h: &FolderHandle, keep: &HashSet<PathBuf>, discard: HashSet<PathBuf>) {
    let _disk = h.disk.lock().await;
    let mut left = h.leftover_temps.lock().expect("temps lock");
    left.extend(keep.iter().cloned());
    left.extend(discard);
    left.retain(|t| {
        if keep.contains(t) {
            return true;
        }
        match fs::remove_file(t) {
            Ok(()) => tracing::debug!(path = %t.display(), "removed the temp file of a pull no longer needed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %t.display(), "cannot remove a leftover temp file: {e}"),
        }
        false
    });
}

/// What a pull pass has come to so far.
#[derive(Default)]
struct Tally {
    /// What the folder task does next.
    outcome: Outcome,
    /// The items not pulled, with why.
    failed: Vec<NeedItem>,
    /// Something was put in place.
    changed: bool,
    /// A conflict copy was made: the scanner should record it.
    rescan: bool,
    /// Temp files of pulls that failed, kept for a resume.
    keep: HashSet<PathBuf>,
    /// Temp files of pulls that were refused, to remove.
    discard: HashSet<PathBuf>,
}

impl Tally {
    /// Takes in one applied action.
    fn add(&mut self, r: Result<Applied, tokio::task::JoinError>) {
        let (path, size, r, tmp) = match r {
            Ok(x) => x,
            Err(e) => {
                tracing::error!("a pull task failed: {e}");
                self.outcome = Outcome::Retry;
                return;
            }
        };
        match r {
            Ok(made_copy) => {
                self.changed = true;
                self.rescan |= made_copy;
            }
            Err(e) => {
                tracing::debug!(%path, "not pulled: {e}");
                if e.keeps_temp() {
                    self.keep.extend(tmp);
                } else {
                    self.discard.extend(tmp);
                }
                match e.outcome() {
                    Outcome::Rescan => self.outcome = Outcome::Rescan,
                    Outcome::Retry if self.outcome == Outcome::Done => {
                        self.outcome = Outcome::Retry
                    }
                    _ => {}
                }
                self.failed.push(NeedItem {
                    path: path.to_string(),
                    size,
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// The items `actions` would pull, each with `reason`.
fn needed(actions: &[Action], reason: &str) -> Vec<NeedItem> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Take { remote, .. } => Some(NeedItem {
                path: remote.path.to_string(),
                size: remote.size,
                reason: reason.to_owned(),
            }),
            _ => None,
        })
        .collect()
}

fn set_need(h: &FolderHandle, items: Vec<NeedItem>) {
    let mut st = h.status.lock().expect("status lock");
    st.need_items = items.len() as u64;
    st.need_bytes = items.iter().map(|i| i.size).sum();
    st.need = items.into_iter().take(MAX_LISTED).collect();
}

/// Applies one action; `Ok(true)` if it made a conflict copy.
async fn apply(
    engine: &Arc<Engine>,
    folder: &Folder,
    action: Action,
    pass: &Pass,
) -> Result<bool, PullError> {
    let row = folder.row;
    match action {
        Action::Merge {
            path,
            seen,
            version,
        } => {
            let merged = engine
                .index
                .run(move |i| i.set_local_version(row, &path, seen, &version))
                .await?;
            if merged {
                Ok(false)
            } else {
                Err(PullError::LocalChanged)
            }
        }
        Action::Won {
            path,
            copy,
            local,
            remote,
            device,
        } => {
            let new = engine
                .index
                .run(move |i| {
                    i.record_conflict(row, &path, &copy, (&local, &remote), &device, true)
                })
                .await?;
            if new {
                tracing::info!(folder = %folder.id, "conflict: the local version won");
            }
            Ok(false)
        }
        Action::Take {
            remote,
            sources,
            local,
            version,
            conflict,
        } => {
            let made_copy = conflict.is_some();
            take(
                engine,
                folder,
                *remote,
                sources,
                local.map(|l| *l),
                version,
                conflict,
                pass,
            )
            .await?;
            Ok(made_copy)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn take(
    engine: &Arc<Engine>,
    folder: &Folder,
    remote: RemoteFile,
    sources: Vec<DeviceId>,
    local: Option<LocalFile>,
    version: VersionVector,
    conflict: Option<(RelPath, DeviceId)>,
    pass: &Pass,
) -> Result<(), PullError> {
    let root = folder.path.clone();
    let live_local = local.as_ref().filter(|l| !l.record.deleted).cloned();
    // Assemble the new content (files and links) before touching anything.
    let mut chunks: Vec<ChunkInfo> = Vec::new();
    let staged: Option<PathBuf> = if remote.deleted || remote.kind == FileKind::Dir {
        None
    } else if remote.kind == FileKind::Symlink {
        parents(&root, &remote.path)?;
        let tmp = temp_path(&root, &remote, "link");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(remote.symlink_target.as_deref().unwrap_or(""), &tmp)?;
        Some(tmp)
    } else {
        let same_content = live_local
            .as_ref()
            .is_some_and(|l| l.record.kind == FileKind::File && l.record.hash == remote.hash);
        if !same_content {
            room_for(&root, &remote)?;
        }
        let prefetched;
        (chunks, prefetched) = chunk_list(engine, folder, &remote, &sources, &pass.reads).await?;
        if same_content {
            // Only the version or metadata differ: no need to copy the file.
            None
        } else {
            Some(assemble(engine, folder, &remote, &sources, &chunks, prefetched, pass).await?)
        }
    };

    let row = folder.row;
    let path = remote.path.clone();
    // Only what leaves the disk goes to the history: not a file whose content
    // stays (a metadata or version change), nor a directory that stays one.
    let stays = !remote.deleted
        && match remote.kind {
            FileKind::File => staged.is_none(),
            FileKind::Dir => live_local
                .as_ref()
                .is_some_and(|l| l.record.kind == FileKind::Dir),
            FileKind::Symlink => false,
        };
    let superseded = if conflict.is_some() || stays || live_local.is_none() {
        None
    } else if remote.deleted {
        Some(Superseded::Deleted)
    } else {
        Some(Superseded::Replaced)
    };
    let conflict_copy = conflict.as_ref().map(|(p, _)| p.clone());
    let expected = live_local.as_ref().map(|l| l.meta);
    let remote2 = remote.clone();
    let meta_if_deleted = expected.unwrap_or(FileMeta {
        kind: remote.kind,
        size: 0,
        mtime_ns: remote.mtime_ns,
        permissions: remote.permissions,
        inode: 0,
        dev: 0,
    });
    let local_kind = live_local.as_ref().map(|l| l.record.kind);
    let reserve = superseded.map(|s| (path.clone(), s));
    // The record this pull was planned on: scans run while pulls fetch, and
    // one that recorded a local change since makes this a conflict to plan
    // again, not a file to replace.
    let seen = local.as_ref().map(|l| l.record.sequence);
    // Its rename into place is recorded with it: not a change to scan for;
    // nor is the move of the file it replaces or deletes into the history.
    let moves: Vec<_> = staged
        .as_deref()
        .map(|tmp| pass.placing.start(tmp))
        .into_iter()
        .chain(
            (superseded.is_some() && local_kind == Some(FileKind::File))
                .then(|| pass.placing.start(&remote.path.to_fs(&folder.path))),
        )
        .collect();
    let committed = pass
        .commits
        .commit(reserve, move |i, reserved, dirs| {
            if i.local_sequence(row, &path)? != seen {
                return Err(crate::index::IndexError::Io(io::Error::other(
                    LOCAL_CHANGED,
                )));
            }
            let pulled = Pulled {
                remote: &remote2,
                version,
                meta: meta_if_deleted,
                chunks: &chunks,
            };
            i.record_pulled_reserved(row, &path, pulled, reserved, |history| {
                let old = OnDisk {
                    expected: expected.as_ref(),
                    kind: local_kind,
                };
                place(
                    &root,
                    &remote2,
                    old,
                    staged.as_deref(),
                    conflict_copy.as_ref(),
                    history,
                    dirs,
                )
            })
        })
        .await;
    if committed.is_err() {
        // Nothing was recorded: whatever moved meanwhile is for a scan to see.
        moves
            .into_iter()
            .for_each(super::watch::PlacingGuard::cancel);
    }
    committed.map_err(|e| match e {
        crate::index::IndexError::Io(io) if io.to_string() == LOCAL_CHANGED => {
            PullError::LocalChanged
        }
        crate::index::IndexError::Io(io) if io.to_string().starts_with(UNSAFE) => {
            PullError::Unsafe(io.to_string())
        }
        crate::index::IndexError::Io(io) if io.to_string() == NOT_EMPTY => {
            PullError::Fetch(NOT_EMPTY.into())
        }
        other => PullError::Index(other),
    })?;
    if let Some((copy, device)) = conflict {
        let path = remote.path.clone();
        let lv = local.map(|l| l.record.version).unwrap_or_default();
        let rv = remote.version.clone();
        engine
            .index
            .run(move |i| i.record_conflict(row, &path, &copy, (&lv, &rv), &device, false))
            .await?;
        tracing::info!(folder = %folder.id, path = %remote.path, "conflict: kept the local version as a conflict copy");
    }
    Ok(())
}

/// What the pulls of one pass share: the bound on chunk requests in flight,
/// and the batchers of their index writes and reads.
struct Pass {
    requests: Arc<Semaphore>,
    commits: Committer,
    reads: Reads,
    /// Where the temp files being renamed into place are registered.
    placing: super::watch::Placing,
}

/// A read of the index on behalf of one pull.
type ReadJob = Box<dyn FnOnce(&mut Index) + Send>;

/// Runs the pulls' index reads (where a file's chunks are found here) in
/// groups: whatever queued while the last group ran goes into the next, under
/// one lock and one blocking task, instead of one each per file.
#[derive(Clone)]
struct Reads {
    jobs: mpsc::Sender<ReadJob>,
}

impl Reads {
    fn start(index: SharedIndex) -> Self {
        let (jobs, mut rx) = mpsc::channel::<ReadJob>(MAX_BATCH);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                index
                    .run(move |i| {
                        for job in batch {
                            job(i);
                        }
                    })
                    .await;
            }
        });
        Self { jobs }
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Index) -> crate::index::Result<R> + Send + 'static,
    ) -> crate::index::Result<R> {
        let (done, result) = oneshot::channel();
        let gone = || crate::index::IndexError::Io(io::Error::other("the pull was stopped"));
        let job: ReadJob = Box::new(move |i| {
            let _ = done.send(f(i));
        });
        self.jobs.send(job).await.map_err(|_| gone())?;
        result.await.unwrap_or_else(|_| Err(gone()))
    }
}

/// Fails with [`PullError::NoSpace`] if the folder's filesystem lacks room
/// for `remote` (less what an earlier attempt already wrote of it).
fn room_for(root: &Path, remote: &RemoteFile) -> Result<(), PullError> {
    let tmp = temp_path(root, remote, "part");
    let written = fs::metadata(&tmp).map_or(0, |m| m.blocks() * 512);
    let need = remote.size.saturating_sub(written);
    let free = crate::disk::free_space(root)?;
    if need > free {
        return Err(PullError::NoSpace { need, free });
    }
    Ok(())
}

/// Whether a peer is asked only when others fail: it sent a corrupt chunk
/// or left a request unanswered.
fn suspect(engine: &Engine, d: &DeviceId) -> bool {
    let c = engine.counters(d);
    c.bad_chunks.load(Ordering::Relaxed) > 0 || c.stalled_requests.load(Ordering::Relaxed) > 0
}

/// Notes that `d` left a request unanswered; the error a pull reports.
fn stalled(engine: &Engine, d: &DeviceId) -> PullError {
    let n = engine
        .counters(d)
        .stalled_requests
        .fetch_add(1, Ordering::Relaxed)
        + 1;
    let secs = engine.request_timeout().as_secs();
    tracing::warn!(device = %d, stalled_requests = n, "a request got no answer within {secs} s");
    PullError::Fetch(format!("device {d}: no answer within {secs} s"))
}

/// Files up to this size are pulled more at a time than larger ones.
const SMALL_FILE: u64 = 256 << 10;

/// Most placements recorded in one transaction.
const MAX_BATCH: usize = 128;

/// Records one placement, given the history row reserved for the version it
/// replaces.
type CommitFn = Box<
    dyn FnOnce(&mut Index, Option<i64>, &mut HashSet<PathBuf>) -> crate::index::Result<()> + Send,
>;
/// A placement, the version it replaces (to reserve a history row for), and
/// where its result goes.
type CommitJob = (
    CommitFn,
    Option<(RelPath, Superseded)>,
    oneshot::Sender<crate::index::Result<()>>,
);

/// Records placements in batches: whatever queued while the last batch ran
/// goes into the next transactions, so small files do not pay a commit (and a
/// directory fsync) each. A batch is two transactions: the first reserves the
/// history rows of the versions the placements replace and commits before
/// anything moves (so a kill during the moves cannot leave a version set aside
/// without its row); the second holds the placements, each in its savepoint,
/// and commits once the directories they renamed into are fsynced.
#[derive(Clone)]
struct Committer {
    jobs: mpsc::Sender<CommitJob>,
}

impl Committer {
    /// Starts the batcher of a folder's pass; each batch holds the folder's
    /// disk lock (`h.disk`) while it moves files and records them, so no
    /// scan sees a file half-way.
    fn start(index: SharedIndex, h: Arc<FolderHandle>) -> Self {
        let folder = h.folder().row;
        let (jobs, mut rx) = mpsc::channel::<CommitJob>(MAX_BATCH);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let _disk = h.disk.lock().await;
                index.run(move |i| run_batch(i, folder, batch)).await;
            }
        });
        Self { jobs }
    }

    async fn commit(
        &self,
        reserve: Option<(RelPath, Superseded)>,
        f: impl FnOnce(&mut Index, Option<i64>, &mut HashSet<PathBuf>) -> crate::index::Result<()>
        + Send
        + 'static,
    ) -> crate::index::Result<()> {
        let (done, result) = oneshot::channel();
        let gone = || crate::index::IndexError::Io(io::Error::other("the pull was stopped"));
        self.jobs
            .send((Box::new(f), reserve, done))
            .await
            .map_err(|_| gone())?;
        result.await.unwrap_or_else(|_| Err(gone()))
    }
}

fn run_batch(i: &mut Index, folder: i64, batch: Vec<CommitJob>) {
    let mut fns = Vec::with_capacity(batch.len());
    let mut wants = Vec::with_capacity(batch.len());
    let mut dones = Vec::with_capacity(batch.len());
    for (f, want, done) in batch {
        fns.push(f);
        wants.push(want);
        dones.push(done);
    }
    let fail_all = |dones: Vec<oneshot::Sender<_>>, msg: String| {
        for done in dones {
            let _ = done.send(Err(crate::index::IndexError::Io(io::Error::other(
                msg.clone(),
            ))));
        }
    };
    // First transaction: the history rows, committed before anything moves.
    let asked: Vec<(&RelPath, Superseded)> = wants.iter().flatten().map(|(p, s)| (p, *s)).collect();
    let mut reserved = if asked.is_empty() {
        Vec::new()
    } else {
        match i.reserve_superseded(folder, &asked) {
            Ok(ids) => ids,
            Err(e) => return fail_all(dones, e.to_string()),
        }
    }
    .into_iter();
    let ids: Vec<Option<i64>> = wants
        .iter()
        .map(|w| w.as_ref().and_then(|_| reserved.next().flatten()))
        .collect();
    // Second: the moves and the records.
    let mut dirs = HashSet::new();
    let results = i.batch(|i| {
        let results: Vec<crate::index::Result<()>> = fns
            .into_iter()
            .zip(ids)
            .map(|(f, id)| f(i, id, &mut dirs))
            .collect();
        for d in &dirs {
            let _ = sync_dir(d);
        }
        Ok(results)
    });
    match results {
        Ok(results) => {
            for (done, r) in dones.into_iter().zip(results) {
                let _ = done.send(r);
            }
        }
        Err(e) => fail_all(dones, e.to_string()),
    }
}

const LOCAL_CHANGED: &str = "local file changed";
const NOT_EMPTY: &str =
    "the directory holds files that are not synced (ignored ones?), so it stays";
const UNSAFE: &str = "unsafe path";

/// Whether `a` and `b` are both regular files (not followed through a
/// symlink) with the same bytes.
fn same_file_bytes(a: &Path, b: &Path) -> io::Result<bool> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
    };
    let (Ok(mut fa), Ok(mut fb)) = (open(a), open(b)) else {
        return Ok(false);
    };
    let (ma, mb) = (fa.metadata()?, fb.metadata()?);
    if !ma.is_file() || !mb.is_file() || ma.len() != mb.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            // Same length, so `b` is at its end too.
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Deterministic temp name beside the target, so an interrupted pull of the
/// same version resumes. The caller has made the parents (`ensure_parents`).
fn temp_path(root: &Path, remote: &RemoteFile, ext: &str) -> PathBuf {
    let p = blake3::hash(remote.path.as_str().as_bytes()).to_hex();
    let v = remote
        .hash
        .map(|h| h.to_hex()[..16].to_owned())
        .unwrap_or_default();
    let target = remote.path.to_fs(root);
    target
        .parent()
        .unwrap_or(root)
        .join(format!("{TEMP_PREFIX}{}-{v}.{ext}", &p[..16]))
}

/// Removes ferry's temp files from `dir` (left by pulls that did not finish),
/// so a directory deleted remotely can go.
fn remove_temps(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// What is on disk at a path before a pull replaces it.
#[derive(Clone, Copy)]
struct OnDisk<'a> {
    /// Its stat fields as the index last saw them (`None`: nothing there).
    expected: Option<&'a FileMeta>,
    /// Its kind as indexed.
    kind: Option<FileKind>,
}

/// Checks that the path on disk is still what the index last saw, moves the
/// old version out of the way (to the history or a conflict copy), and renames
/// the staged version into place. Runs inside the index transaction that
/// records it (`history` is the row already committed for the old version);
/// the directories it renamed into are added to `dirs`, to be fsynced before
/// the commit.
fn place(
    root: &Path,
    remote: &RemoteFile,
    old: OnDisk<'_>,
    staged: Option<&Path>,
    conflict: Option<&RelPath>,
    history: Option<i64>,
    dirs: &mut HashSet<PathBuf>,
) -> io::Result<Option<FileMeta>> {
    let (expected, local_kind) = (old.expected, old.kind);
    let target = remote.path.to_fs(root);
    ensure_parents(root, &remote.path)?;
    let on_disk = fs::symlink_metadata(&target).ok();
    // What is on disk must be what the index last saw.
    let unchanged = match (expected, &on_disk) {
        (None, None) => true,
        (None, Some(m)) => {
            // A directory we are about to create (or that a delete removed
            // already) is fine; anything else is new local data.
            m.is_dir() && remote.kind == FileKind::Dir && !remote.deleted
        }
        // Gone since the last scan: a local delete the scanner has not
        // recorded yet. Even for a remote delete this is refused, so that
        // the rescan records it as the user's delete (keeping the version
        // it removed, for a folder with `history.local`) and the deletes
        // then merge; taking the remote delete here would record a version
        // as set aside whose bytes never were.
        (Some(_), None) => false,
        (Some(e), Some(m)) => {
            e.kind == FileKind::Dir && m.is_dir()
                || (m.len() == e.size && mtime_ns(m) == e.mtime_ns && m.ino() == e.inode)
        }
    };
    if !unchanged {
        return Err(io::Error::other(LOCAL_CHANGED));
    }
    let exists = on_disk.is_some();

    // Move the old version away, unless it stays (a directory staying a
    // directory, or a file whose content is already right).
    let dir_on_disk = on_disk.as_ref().is_some_and(|m| m.is_dir());
    let keep = !remote.deleted
        && ((remote.kind == FileKind::Dir && dir_on_disk)
            || (Some(remote.kind) == local_kind && staged.is_none()));
    if exists && !keep {
        if let Some(copy) = conflict {
            let dest = copy.to_fs(root);
            ensure_parents(root, copy)?;
            if fs::symlink_metadata(&dest).is_ok() {
                // With three or more devices, another device's copy of this
                // very conflict may have arrived first: holding the same
                // bytes, it keeps the local version already. Anything else
                // there is not ours to replace.
                if !same_file_bytes(&target, &dest)? {
                    return Err(io::Error::other(LOCAL_CHANGED));
                }
                fs::remove_file(&target)?;
            } else {
                fs::rename(&target, &dest)?;
            }
        } else {
            match local_kind {
                Some(FileKind::File) => {
                    let dir = marker_dir(root).join("versions");
                    fs::create_dir_all(&dir)?;
                    let name = history.map_or_else(
                        || format!("unrecorded-{}", crate::index::now_secs()),
                        |id| id.to_string(),
                    );
                    let dest = dir.join(&name);
                    if fs::symlink_metadata(&dest).is_ok() {
                        // Set aside by a pull killed before its commit in
                        // a ferry that did not reserve history rows first
                        // (the id was handed out again): keep those bytes.
                        let keep = dir.join(format!("orphan-{name}-{}", crate::index::now_secs()));
                        tracing::warn!(
                            kept = %keep.display(),
                            "found the set-aside version of an interrupted pull; keeping it"
                        );
                        fs::rename(&dest, keep)?;
                    }
                    fs::rename(&target, dest)?;
                }
                Some(FileKind::Dir) => {
                    match remove_temps(&target).and_then(|()| fs::remove_dir(&target)) {
                        Ok(()) => {}
                        // Files the index does not know (ignored ones) are in it:
                        // keep the directory and say why.
                        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                            return Err(io::Error::other(NOT_EMPTY));
                        }
                        Err(e) => return Err(e),
                    }
                }
                // A symlink: nothing but its target, which the history row keeps.
                _ => fs::remove_file(&target)?,
            }
        }
    }

    // The directories are fsynced once per batch, before its commit.
    dirs.insert(target.parent().unwrap_or(root).to_path_buf());
    if remote.deleted {
        return Ok(None);
    }
    match remote.kind {
        FileKind::Dir => {
            if fs::symlink_metadata(&target).is_err() {
                fs::create_dir(&target)?;
            }
            fs::set_permissions(&target, fs::Permissions::from_mode(remote.permissions))?;
        }
        FileKind::File | FileKind::Symlink => match staged {
            Some(tmp) => fs::rename(tmp, &target)?,
            None => {
                // Same content already in place: bring the metadata in line.
                fs::set_permissions(&target, fs::Permissions::from_mode(remote.permissions))?;
                let f = OpenOptions::new().write(true).open(&target)?;
                f.set_modified(system_time(remote.mtime_ns))?;
            }
        },
    }
    let m = fs::symlink_metadata(&target)?;
    Ok(Some(FileMeta {
        kind: remote.kind,
        size: if remote.kind == FileKind::File {
            m.len()
        } else {
            0
        },
        mtime_ns: mtime_ns(&m),
        permissions: m.mode() & 0o7777,
        inode: m.ino(),
        dev: m.dev(),
    }))
}

/// [`ensure_parents`], with a parent that would let the path escape reported
/// as such.
fn parents(root: &Path, rel: &RelPath) -> Result<(), PullError> {
    ensure_parents(root, rel).map_err(|e| {
        let msg = e.to_string();
        if msg.starts_with(UNSAFE) {
            PullError::Unsafe(msg)
        } else {
            PullError::Io(e)
        }
    })
}

/// Creates the missing parent directories of `rel` under `root`, refusing a
/// parent that is a symlink or not a directory (which would let a path escape
/// the folder).
fn ensure_parents(root: &Path, rel: &RelPath) -> io::Result<()> {
    let mut dir = root.to_path_buf();
    let parts: Vec<&str> = rel.as_str().split('/').collect();
    for part in &parts[..parts.len() - 1] {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{UNSAFE}: {} is not a directory (a symlink?)",
                    dir.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&dir)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Which peers chunk number `n` of a file asks, in order, when the first
/// `good` of `total` peers have sent no corrupt chunk (peers sorted good
/// first): each good peer twice, starting at a different one per chunk so
/// the load spreads, then the others once; with no good peer, the first one
/// twice and the rest once.
fn ask_order(n: usize, good: usize, total: usize) -> Vec<usize> {
    let spread = good.max(1).min(total);
    (0..spread * 2)
        .map(|k| (n + k) % spread)
        .chain(spread..total)
        .collect()
}

/// A chunk to copy from local files: its hash, where it goes, where it is.
type LocalCopy = (ChunkHash, Vec<ChunkInfo>, Vec<crate::index::ChunkSource>);

/// Copies chunks found in local files into `file`. One thread: writes to one
/// file serialise on its inode lock anyway (two threads measured slower for a
/// 1 GiB edit). Returns the chunks that could not be copied.
///
/// With `verify`, each chunk is read and checked against its hash, trying
/// each of its sources. Without, runs of chunks that lie in the same order in
/// the first source (most of an edited file) are copied in one go in the
/// kernel, unread: the whole-file hash checks them afterwards, and a
/// mismatch leaves the temp file for a verified retry.
fn copy_local(
    file: &File,
    jobs: Vec<LocalCopy>,
    verify: bool,
    marker: &Marker,
) -> io::Result<Vec<(ChunkHash, Vec<ChunkInfo>)>> {
    if verify {
        return copy_local_verified(file, jobs, marker);
    }
    // Every place a chunk goes, with where its first source has it.
    struct Piece {
        job: usize,
        src: usize,
        src_off: u64,
        dst_off: u64,
        len: u64,
    }
    let mut paths: Vec<&Path> = Vec::new();
    let mut by_path: HashMap<&Path, usize> = HashMap::new();
    let mut pieces = Vec::new();
    for (job, (_, places, sources)) in jobs.iter().enumerate() {
        let s = &sources[0];
        let src = *by_path.entry(&s.path).or_insert_with(|| {
            paths.push(&s.path);
            paths.len() - 1
        });
        for c in places {
            pieces.push(Piece {
                job,
                src,
                src_off: s.offset,
                dst_off: c.offset,
                len: c.len as u64,
            });
        }
    }
    pieces.sort_by_key(|p| p.dst_off);
    let mut files: Vec<Option<File>> = paths
        .iter()
        .map(|p| {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)
                .ok()
        })
        .collect();
    let mut failed = vec![false; jobs.len()];
    let mut written = 0u64;
    let mut i = 0;
    while i < pieces.len() {
        // The run of pieces contiguous both here and in their source.
        let mut j = i + 1;
        while j < pieces.len()
            && pieces[j].src == pieces[i].src
            && pieces[j].dst_off == pieces[j - 1].dst_off + pieces[j - 1].len
            && pieces[j].src_off == pieces[j - 1].src_off + pieces[j - 1].len
        {
            j += 1;
        }
        let run = &pieces[i..j];
        let len: u64 = run.iter().map(|p| p.len).sum();
        // In steps, each reported as it lands: the verifier hashes one step
        // while the next is copied, instead of reading a run of half the
        // file back after it (a 100-byte insert is two such runs).
        let mut done = 0u64;
        while done < len {
            let step = (len - done).min(WRITEBACK_EVERY);
            let copied = match &files[run[0].src] {
                Some(src) => copy_range(
                    src,
                    run[0].src_off + done,
                    file,
                    run[0].dst_off + done,
                    step,
                ),
                None => Ok(0),
            };
            let whole = match copied {
                Ok(n) => n == step,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Err(e),
                Err(_) => {
                    // A source that cannot be read is not asked again.
                    files[run[0].src] = None;
                    false
                }
            };
            if !whole {
                run.iter().for_each(|p| failed[p.job] = true);
                break;
            }
            marker.filled(run[0].dst_off + done, step);
            done += step;
            written += step;
            if written >= WRITEBACK_EVERY {
                start_writeback(file);
                written = 0;
            }
        }
        i = j;
    }
    let missed: Vec<LocalCopy> = jobs
        .into_iter()
        .zip(failed)
        .filter(|(_, f)| *f)
        .map(|(j, _)| j)
        .collect();
    // What the first sources could not give, the others may, checked.
    copy_local_verified(file, missed, marker)
}

/// [`copy_local`] with each chunk read and checked against its hash.
fn copy_local_verified(
    file: &File,
    jobs: Vec<LocalCopy>,
    marker: &Marker,
) -> io::Result<Vec<(ChunkHash, Vec<ChunkInfo>)>> {
    let mut missed = Vec::new();
    for (h, places, sources) in jobs {
        let found = sources
            .iter()
            .find_map(|s| read_verified(&s.path, s.offset, s.size, &h));
        match found {
            Some(bytes) => {
                for c in &places {
                    file.write_all_at(&bytes, c.offset)?;
                    marker.filled(c.offset, bytes.len() as u64);
                }
            }
            None => missed.push((h, places)),
        }
    }
    Ok(missed)
}

/// The file's chunk list: groups rebuilt from local chunk lists where they
/// match, the rest asked from a peer that has this version.
async fn chunk_list(
    engine: &Arc<Engine>,
    folder: &Folder,
    remote: &RemoteFile,
    sources: &[DeviceId],
    reads: &Reads,
) -> Result<(Vec<ChunkInfo>, LocalSources), PullError> {
    let row = folder.row;
    let path = remote.path.clone();
    let hash = remote.hash.expect("files have a hash");
    // A file of one chunk (most small files): that chunk's hash is the file's,
    // so where it is found locally can be asked in the same index call.
    let single = matches!(remote.groups[..], [g] if g.chunks == 1);
    let (known_lists, single_sources, old) = reads
        .run(move |i| {
            let mut lists = Vec::new();
            if let Some(same) = i.chunks_of_content(&hash)? {
                lists.push(same);
            }
            let old = i.file_chunks(row, &path)?;
            let sources = if single {
                Some(i.chunk_sources(&ChunkHash(hash.0), 4)?)
            } else {
                None
            };
            Ok((lists, sources, old))
        })
        .await?;
    let known_lists: Vec<&Vec<ChunkInfo>> = known_lists.iter().chain(Some(&old)).collect();
    let mut known: HashMap<[u8; 32], Vec<(ChunkHash, u32)>> = HashMap::new();
    for list in known_lists {
        for r in group_ranges(list) {
            let part: Vec<(ChunkHash, u32)> = list[r].iter().map(|c| (c.hash, c.len)).collect();
            known.insert(group_hash(part.iter().map(|(h, s)| (h, *s))), part);
        }
    }
    // A file of one chunk: that chunk is the whole file, so its hash is the
    // file's hash and its list needs no request (checked against the group).
    if let [g] = remote.groups[..]
        && g.chunks == 1
        && let Ok(size) = u32::try_from(g.size)
    {
        let only = (ChunkHash(hash.0), size);
        if group_hash([(&only.0, only.1)]) == g.hash {
            known.insert(g.hash, vec![only]);
        }
    }
    let missing: Vec<u32> = remote
        .groups
        .iter()
        .enumerate()
        .filter(|(_, g)| !known.contains_key(&g.hash))
        .map(|(i, _)| i as u32)
        .collect();
    if !missing.is_empty() {
        let mut fetched = None;
        let mut last_err = PullError::NoSource;
        let mut asked: Vec<&DeviceId> = sources.iter().collect();
        asked.sort_by_key(|d| suspect(engine, d));
        for d in asked {
            let Some(conn) = engine.link(d) else { continue };
            let fetch = fetch_groups(&conn, folder.id.as_str(), &remote.path, &hash, &missing);
            match tokio::time::timeout(engine.request_timeout(), fetch).await {
                Ok(Ok(g)) => {
                    fetched = Some(g);
                    break;
                }
                Ok(Err(e)) => last_err = PullError::Fetch(format!("device {d}: {e}")),
                Err(_) => last_err = stalled(engine, d),
            }
        }
        let fetched = fetched.ok_or(last_err)?;
        for (idx, entries) in missing.iter().zip(fetched) {
            let part: Vec<(ChunkHash, u32)> = entries
                .iter()
                .map(|c| (ChunkHash(c.hash), c.size))
                .collect();
            let expect = &remote.groups[*idx as usize];
            let got = group_hash(part.iter().map(|(h, s)| (h, *s)));
            if got != expect.hash || part.len() != expect.chunks as usize {
                return Err(PullError::Fetch(
                    "a peer sent a chunk list that does not match its record".into(),
                ));
            }
            known.insert(got, part);
        }
    }
    let mut out = Vec::new();
    let mut offset = 0u64;
    for g in &remote.groups {
        for (h, s) in &known[&g.hash] {
            out.push(ChunkInfo {
                offset,
                len: *s,
                hash: *h,
            });
            offset += *s as u64;
        }
    }
    if offset != remote.size {
        return Err(PullError::Fetch("chunk sizes do not add up".into()));
    }
    // Where chunks are known to be here without asking the index again: the
    // old version of this file (most of an edited file), or the one chunk.
    let mut prefetched: LocalSources = HashMap::new();
    if !old.is_empty() {
        let at = remote.path.to_fs(&folder.path);
        for c in &old {
            prefetched.entry(c.hash).or_insert_with(|| {
                vec![crate::index::ChunkSource {
                    path: at.clone(),
                    offset: c.offset,
                    size: c.len,
                }]
            });
        }
    }
    // Found or not, the one chunk has been looked up (an empty list: fetch it).
    if let ([only], Some(sources)) = (&out[..], single_sources)
        && only.hash.0 == hash.0
    {
        prefetched.insert(only.hash, sources);
    }
    Ok((out, prefetched))
}

/// Where chunks can be read locally, by hash.
type LocalSources = HashMap<ChunkHash, Vec<crate::index::ChunkSource>>;

/// Builds the file in its temp path: resumes what an earlier attempt wrote,
/// copies chunks found locally, fetches the rest; then fsyncs, verifies the
/// whole-file hash, and sets permissions and mtime.
async fn assemble(
    engine: &Arc<Engine>,
    folder: &Folder,
    remote: &RemoteFile,
    sources: &[DeviceId],
    chunks: &[ChunkInfo],
    prefetched: LocalSources,
    pass: &Pass,
) -> Result<PathBuf, PullError> {
    let root = folder.path.clone();
    let tmp = temp_path(&root, remote, "part");
    // A file of one chunk (most small files) is that chunk, checked against
    // its hash before it is written; any other file is checked whole: a
    // small one after it is written, a larger one as it fills.
    let expect: FileHash = remote.hash.expect("files have a hash");
    let one_chunk = matches!(chunks, [c] if c.hash.0 == expect.0 && c.len as u64 == remote.size);
    if one_chunk && prefetched.get(&chunks[0].hash).is_some_and(Vec::is_empty) {
        // Looked up and not here: nothing to resume or copy.
        let peers = Peers::new(engine, folder, remote, sources);
        return assemble_fetched(peers, &root, remote, chunks[0], pass, tmp).await;
    }
    // Making the parents and the file waits on the filesystem (inode
    // allocation, directory locks): not on an async worker.
    let (file, resumed) = {
        let (rel, tmp, size) = (remote.path.clone(), tmp.clone(), remote.size);
        tokio::task::spawn_blocking(move || -> Result<(File, bool), PullError> {
            parents(&root, &rel)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&tmp)?;
            let resumed = file.metadata()?.len() == size;
            file.set_len(size)?;
            Ok((file, resumed))
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??
    };
    let file = Arc::new(file);
    let verifier = if !one_chunk && remote.size > SMALL_FILE {
        Some(Verifier::start(file.clone(), remote.size)?)
    } else {
        None
    };
    let marker = verifier.as_ref().map(Verifier::marker).unwrap_or_default();

    // Which chunks still need bytes, grouped by hash (a chunk may repeat).
    let mut todo: HashMap<ChunkHash, Vec<&ChunkInfo>> = HashMap::new();
    {
        let (f, m) = (file.clone(), marker.clone());
        let list: Vec<ChunkInfo> = chunks.to_vec();
        let present: HashSet<u64> = if resumed {
            tokio::task::spawn_blocking(move || {
                list.iter()
                    .filter(|c| {
                        let mut buf = vec![0u8; c.len as usize];
                        let ok = f.read_exact_at(&mut buf, c.offset).is_ok()
                            && blake3::hash(&buf).as_bytes() == &c.hash.0;
                        if ok {
                            m.filled(c.offset, c.len as u64);
                        }
                        ok
                    })
                    .map(|c| c.offset)
                    .collect()
            })
            .await
            .map_err(|e| io::Error::other(e.to_string()))?
        } else {
            HashSet::new()
        };
        for c in chunks {
            if !present.contains(&c.offset) {
                todo.entry(c.hash).or_default().push(c);
            }
        }
    }

    // Where chunks are found locally.
    let started = std::time::Instant::now();
    let hashes: Vec<ChunkHash> = todo
        .keys()
        .filter(|h| !prefetched.contains_key(h))
        .copied()
        .collect();
    let mut local = prefetched;
    if !hashes.is_empty() {
        let found = pass
            .reads
            .run(move |i| i.chunk_sources_of(&hashes, 4))
            .await?;
        local.extend(found);
    }
    let mut remote_todo: Vec<(ChunkHash, Vec<ChunkInfo>)> = Vec::new();
    let mut local_jobs: Vec<LocalCopy> = Vec::new();
    for (h, places) in todo {
        let places: Vec<ChunkInfo> = places.into_iter().copied().collect();
        match local.remove(&h) {
            Some(sources) if !sources.is_empty() => local_jobs.push((h, places, sources)),
            _ => remote_todo.push((h, places)),
        }
    }
    let looked_up = started.elapsed();

    // Local copies on a thread while the rest comes from peers. A resumed
    // file is checked chunk by chunk: it may be here because the whole-file
    // check failed (a local source that changed under us).
    let verify = resumed || one_chunk;
    let copying = (!local_jobs.is_empty()).then(|| {
        let (f, m) = (file.clone(), marker.clone());
        tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            copy_local(&f, local_jobs, verify, &m).map(|missed| (missed, t.elapsed()))
        })
    });
    let fetcher = Fetcher::new(
        Peers::new(engine, folder, remote, sources),
        file.clone(),
        marker,
        remote.size,
    );
    let mut fetches = tokio::task::JoinSet::new();
    // In file order: the verifier follows the filled prefix, and the disk is
    // written front to back.
    remote_todo.sort_by_key(|(_, places)| places[0].offset);
    let mut asked = 0;
    if !remote_todo.is_empty() && fetcher.peers.conns.is_empty() {
        if let Some(c) = copying {
            // The copy writes into the temp file: let it end first.
            let _ = c.await;
        }
        return Err(PullError::NoSource);
    }
    // Finished fetches are taken in as more start: a finished task keeps
    // its memory until it is joined, and a GiB is about 13,000 chunks.
    let mut first_err = None;
    for (h, places) in remote_todo {
        fetcher
            .spawn(&mut fetches, &pass.requests, asked, h, places)
            .await;
        asked += 1;
        while let Some(r) = fetches.try_join_next() {
            fetched(r, &mut first_err);
        }
    }
    let mut local_took = std::time::Duration::ZERO;
    if let Some(c) = copying {
        // The fetched chunks go in while the copy goes on: gathered, a few
        // of them (an edit) would wait for the end of the copy, and the
        // verifier with them, at their place, hashing all the file after
        // them only once the copy is done (a 100-byte insert in 1 GiB: half
        // a GiB, about 100 ms, after the last byte was copied).
        while let Some(r) = fetches.join_next().await {
            fetched(r, &mut first_err);
        }
        if let Err(e) = fetcher.writes.flush() {
            first_err.get_or_insert(e.into());
        }
        let (missed, took) = c.await.map_err(|e| io::Error::other(e.to_string()))??;
        local_took = took;
        if !missed.is_empty() && fetcher.peers.conns.is_empty() {
            return Err(PullError::NoSource);
        }
        let mut missed = missed;
        missed.sort_by_key(|(_, places)| places[0].offset);
        for (h, places) in missed {
            fetcher
                .spawn(&mut fetches, &pass.requests, asked, h, places)
                .await;
            asked += 1;
            while let Some(r) = fetches.try_join_next() {
                fetched(r, &mut first_err);
            }
        }
    }
    while let Some(r) = fetches.join_next().await {
        fetched(r, &mut first_err);
    }
    // The chunks still gathered, checked ones all: written even when the
    // pull failed, for the next try to resume with.
    if let Err(e) = fetcher.writes.flush() {
        first_err.get_or_insert(e.into());
    }
    if let Some(e) = first_err {
        // The chunks that arrived stay in the temp file for the next try.
        return Err(e);
    }

    let fetched = started.elapsed();
    // Durable, verified, with its metadata.
    let mtime = system_time(remote.mtime_ns);
    let perms = remote.permissions;
    let size = remote.size;
    let tmp2 = tmp.clone();
    let ok = tokio::task::spawn_blocking(move || -> io::Result<bool> {
        stamp(&file, &tmp2, mtime, perms)?;
        match verifier {
            None if one_chunk => {
                file.sync_all()?;
                Ok(true)
            }
            None => {
                let hashed = hash_file(&tmp2, size)?;
                file.sync_all()?;
                Ok(hashed.as_bytes() == &expect.0)
            }
            // The fsync waits on the disk while the hash finishes: side by side.
            Some(v) => std::thread::scope(|s| {
                let synced = s.spawn(|| file.sync_all());
                let hashed = v.finish();
                synced
                    .join()
                    .map_err(|_| io::Error::other("fsync thread panicked"))??;
                Ok(hashed?.as_bytes() == &expect.0)
            }),
        }
    })
    .await
    .map_err(|e| io::Error::other(e.to_string()))??;
    if !ok {
        // Unless every chunk was checked as it was written, the next try
        // resumes from this file, checking each chunk and fetching again
        // the ones that are wrong (a local source that changed under us).
        if verify {
            let _ = fs::remove_file(&tmp);
        }
        return Err(PullError::HashMismatch);
    }
    tracing::debug!(
        path = %remote.path,
        chunks = chunks.len(),
        fetched = asked,
        lookup_ms = looked_up.as_millis() as u64,
        local_ms = local_took.as_millis() as u64,
        fetch_ms = (fetched - looked_up).as_millis() as u64,
        verify_ms = (started.elapsed() - fetched).as_millis() as u64,
        "file assembled"
    );
    Ok(tmp)
}

/// Gives an assembled temp file its mtime and permissions; done before its
/// fsync, so the one fsync makes them durable too.
fn stamp(file: &File, path: &Path, mtime: std::time::SystemTime, perms: u32) -> io::Result<()> {
    file.set_modified(mtime)?;
    fs::set_permissions(path, fs::Permissions::from_mode(perms))
}

/// Takes in a finished chunk fetch, keeping the first failure.
fn fetched(
    r: Result<Result<(), PullError>, tokio::task::JoinError>,
    first_err: &mut Option<PullError>,
) {
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            first_err.get_or_insert(e);
        }
        Err(e) => {
            first_err.get_or_insert(PullError::Fetch(e.to_string()));
        }
    }
}

/// Builds a file of one chunk found nowhere here (most small files): the
/// chunk is fetched (and checked against its hash, which is the file's) into
/// memory, then written to the temp path, given its metadata and fsynced in
/// one blocking step, instead of a step to make the file before the fetch
/// and another to finish it after. A leftover temp file is overwritten: it
/// holds at most this one chunk.
async fn assemble_fetched(
    peers: Peers,
    root: &Path,
    remote: &RemoteFile,
    chunk: ChunkInfo,
    pass: &Pass,
    tmp: PathBuf,
) -> Result<PathBuf, PullError> {
    if peers.conns.is_empty() {
        return Err(PullError::NoSource);
    }
    let bytes = {
        let _slot = pass.requests.acquire().await.expect("semaphore open");
        peers.fetch(0, chunk.hash, chunk).await?
    };
    let root = root.to_path_buf();
    let (rel, at) = (remote.path.clone(), tmp.clone());
    let (mtime, perms) = (system_time(remote.mtime_ns), remote.permissions);
    tokio::task::spawn_blocking(move || -> Result<(), PullError> {
        parents(&root, &rel)?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&at)?;
        file.write_all_at(&bytes, 0)?;
        stamp(&file, &at, mtime, perms)?;
        file.sync_all()?;
        Ok(())
    })
    .await
    .map_err(|e| io::Error::other(e.to_string()))??;
    Ok(tmp)
}

/// The peers a file's chunks are asked from, and how one chunk is asked.
struct Peers {
    engine: Arc<Engine>,
    /// The peers to ask, those that have sent corrupt chunks or stalled last.
    conns: Vec<(DeviceId, Connection)>,
    /// How many of `conns` have not.
    good: usize,
    folder_id: String,
    path: RelPath,
}

impl Peers {
    fn new(
        engine: &Arc<Engine>,
        folder: &Folder,
        remote: &RemoteFile,
        sources: &[DeviceId],
    ) -> Self {
        let mut conns: Vec<(DeviceId, Connection)> = sources
            .iter()
            .filter_map(|d| engine.link(d).map(|c| (*d, c)))
            .collect();
        // Spread the requests over the good peers; the others are asked only
        // when those fail.
        conns.sort_by_key(|(d, _)| suspect(engine, d));
        let good = conns.iter().filter(|(d, _)| !suspect(engine, d)).count();
        Self {
            engine: engine.clone(),
            conns,
            good,
            folder_id: folder.id.to_string(),
            path: remote.path.clone(),
        }
    }

    /// The bytes of chunk `h` (the `n`th asked for this file), read at
    /// `first` in the peer's copy and checked against its hash: from the
    /// peer whose turn it is, then from the others. A corrupt chunk or an
    /// unanswered request counts against the peer that sent it.
    async fn fetch(&self, n: usize, h: ChunkHash, first: ChunkInfo) -> Result<Vec<u8>, PullError> {
        let engine = &self.engine;
        let mut last = PullError::NoSource;
        for i in ask_order(n, self.good, self.conns.len()) {
            let (dev, conn) = &self.conns[i];
            let fetch = fetch_chunk(
                conn,
                &self.folder_id,
                &self.path,
                first.offset,
                first.len,
                &h,
            );
            let Ok(fetched) = tokio::time::timeout(engine.request_timeout(), fetch).await else {
                last = stalled(engine, dev);
                continue;
            };
            match fetched {
                Ok(bytes) => {
                    engine
                        .counters(dev)
                        .chunk_bytes_in
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    return Ok(bytes);
                }
                Err(FetchError::Corrupt) => {
                    let bad = engine
                        .counters(dev)
                        .bad_chunks
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    tracing::warn!(device = %dev, bad_chunks = bad, "a chunk failed its hash check; fetching it again");
                    last = PullError::Fetch(format!("device {dev} sent a corrupt chunk"));
                }
                Err(e) => last = PullError::Fetch(format!("device {dev}: {e}")),
            }
        }
        Err(last)
    }
}

/// Fetches chunks of one file from the peers that have its version, each
/// request on a task of its own, bounded by the pass's requests in flight.
struct Fetcher {
    peers: Arc<Peers>,
    writes: Arc<Gather>,
}

impl Fetcher {
    fn new(peers: Peers, file: Arc<File>, marker: Marker, size: u64) -> Self {
        Self {
            peers: Arc::new(peers),
            writes: Arc::new(Gather::new(file, marker, size)),
        }
    }

    /// Starts fetching the chunk `h` (the `n`th asked for this file) into
    /// each of its `places`, once a request slot is free.
    async fn spawn(
        &self,
        set: &mut tokio::task::JoinSet<Result<(), PullError>>,
        requests: &Arc<Semaphore>,
        n: usize,
        h: ChunkHash,
        places: Vec<ChunkInfo>,
    ) {
        let permit = requests
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let peers = self.peers.clone();
        let writes = self.writes.clone();
        set.spawn(async move {
            let _permit = permit;
            let bytes = peers.fetch(n, h, places[0]).await?;
            for c in &places[1..] {
                writes.put(c.offset, bytes.clone())?;
            }
            writes.put(places[0].offset, bytes)?;
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &str, version: &[(u64, u64)], hash: u8, mtime: i64) -> RemoteFile {
        let mut v = VersionVector::new();
        for (d, c) in version {
            v = v.with(ShortId(*d), *c);
        }
        RemoteFile {
            path: RelPath::new(path).unwrap(),
            kind: FileKind::File,
            size: 1,
            mtime_ns: mtime,
            permissions: 0o644,
            hash: Some(FileHash([hash; 32])),
            symlink_target: None,
            deleted: false,
            version: v,
            modified_by: ShortId(version[0].0),
            sequence: 1,
            groups: vec![],
        }
    }

    fn local(r: RemoteFile) -> HashMap<String, LocalFile> {
        let meta = FileMeta {
            kind: r.kind,
            size: r.size,
            mtime_ns: r.mtime_ns,
            permissions: r.permissions,
            inode: 1,
            dev: 1,
        };
        HashMap::from([(r.path.as_str().to_owned(), LocalFile { record: r, meta })])
    }

    fn dev(n: u8) -> DeviceId {
        DeviceId::new(iroh::SecretKey::from_bytes(&[n; 32]).public())
    }

    #[test]
    fn a_remote_delete_of_a_file_deleted_here_but_not_yet_scanned_waits_for_the_scan() {
        let root = tempfile::tempdir().unwrap();
        let mut remote = rec("gone.txt", &[(1, 1), (2, 1)], 3, 5);
        remote.deleted = true;
        let expected = FileMeta {
            kind: FileKind::File,
            size: 1,
            mtime_ns: 5,
            permissions: 0o644,
            inode: 1,
            dev: 1,
        };
        let old = OnDisk {
            expected: Some(&expected),
            kind: Some(FileKind::File),
        };
        // With a history row reserved for the version the delete replaces,
        // and without: nothing is on disk to keep, so neither is taken.
        for history in [Some(7), None] {
            let err = place(
                root.path(),
                &remote,
                old,
                None,
                None,
                history,
                &mut HashSet::new(),
            )
            .unwrap_err();
            assert_eq!(err.to_string(), LOCAL_CHANGED);
        }
        assert!(!marker_dir(root.path()).join("versions").exists());
    }

    #[test]
    fn a_conflict_copy_already_synced_from_another_device_is_not_written_twice() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("a.txt");
        let copy = RelPath::new("a.sync-conflict-20261206-101010-abcdef0.txt").unwrap();
        let dest = copy.to_fs(root.path());
        let staged = root.path().join("staged");
        let mut remote = rec("a.txt", &[(1, 1), (2, 1)], 3, 5);
        remote.size = 6;
        for (there, ok) in [(&b"mine"[..], true), (&b"other"[..], false)] {
            fs::write(&target, b"mine").unwrap();
            fs::write(&dest, there).unwrap();
            fs::write(&staged, b"theirs").unwrap();
            let m = fs::metadata(&target).unwrap();
            let expected = FileMeta {
                kind: FileKind::File,
                size: m.len(),
                mtime_ns: mtime_ns(&m),
                permissions: m.mode() & 0o7777,
                inode: m.ino(),
                dev: m.dev(),
            };
            let old = OnDisk {
                expected: Some(&expected),
                kind: Some(FileKind::File),
            };
            let placed = place(
                root.path(),
                &remote,
                old,
                Some(&staged),
                Some(&copy),
                None,
                &mut HashSet::new(),
            );
            if ok {
                // The copy there holds the local version: the remote one
                // takes its place and nothing is lost or duplicated.
                placed.unwrap();
                assert_eq!(fs::read(&target).unwrap(), b"theirs");
                assert_eq!(fs::read(&dest).unwrap(), b"mine");
            } else {
                // Something else under that name: refused, nothing touched.
                assert_eq!(placed.unwrap_err().to_string(), LOCAL_CHANGED);
                assert_eq!(fs::read(&target).unwrap(), b"mine");
                assert_eq!(fs::read(&dest).unwrap(), b"other");
                assert_eq!(fs::read(&staged).unwrap(), b"theirs");
            }
            let mut names: Vec<_> = fs::read_dir(root.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            let mut want = vec!["a.sync-conflict-20261206-101010-abcdef0.txt", "a.txt"];
            if !ok {
                want.push("staged");
            }
            assert_eq!(names, want);
        }
    }

    #[test]
    fn newer_remote_versions_are_taken_and_older_ones_ignored() {
        let l = local(rec("a", &[(1, 1)], 1, 10));
        let acts = plan(&l, vec![(dev(2), rec("a", &[(1, 1), (2, 1)], 2, 20))], None);
        assert!(matches!(&acts[..], [Action::Take { conflict: None, .. }]));
        let l = local(rec("a", &[(1, 2)], 1, 10));
        assert!(plan(&l, vec![(dev(2), rec("a", &[(1, 1)], 2, 20))], None).is_empty());
    }

    #[test]
    fn concurrent_edits_conflict_unless_the_content_is_the_same() {
        let l = local(rec("a", &[(1, 2)], 1, 10));
        // The same content with an older mtime: the versions merge.
        let acts = plan(&l, vec![(dev(2), rec("a", &[(1, 1), (2, 1)], 1, 5))], None);
        assert!(matches!(&acts[..], [Action::Merge { .. }]));
        // The same content with a newer mtime: its metadata is taken, with
        // the merged version and no conflict copy.
        let acts = plan(&l, vec![(dev(2), rec("a", &[(1, 1), (2, 1)], 1, 20))], None);
        match &acts[..] {
            [
                Action::Take {
                    conflict: None,
                    remote,
                    version,
                    ..
                },
            ] => {
                assert_eq!(remote.mtime_ns, 20);
                assert_eq!(version.get(ShortId(1)), 2);
                assert_eq!(version.get(ShortId(2)), 1);
            }
            other => panic!("{other:?}"),
        }

        // Remote is newer by mtime: the local file becomes the conflict copy.
        let acts = plan(&l, vec![(dev(2), rec("a", &[(1, 1), (2, 1)], 2, 20))], None);
        match &acts[..] {
            [
                Action::Take {
                    conflict: Some((copy, _)),
                    version,
                    ..
                },
            ] => {
                assert!(copy.as_str().starts_with("a.sync-conflict-"));
                assert_eq!(version.get(ShortId(1)), 2);
                assert_eq!(version.get(ShortId(2)), 1);
            }
            other => panic!("{other:?}"),
        }
        // Local is newer: recorded only.
        let acts = plan(&l, vec![(dev(2), rec("a", &[(1, 1), (2, 1)], 2, 5))], None);
        assert!(matches!(&acts[..], [Action::Won { .. }]));
    }

    #[test]
    fn names_differing_only_by_case_are_reported_not_pulled() {
        let l = local(rec("Report.txt", &[(1, 1)], 1, 10));
        let acts = plan(
            &l,
            vec![
                (dev(2), rec("report.TXT", &[(2, 1)], 2, 20)),
                (dev(2), rec("other.txt", &[(2, 1)], 2, 20)),
            ],
            None,
        );
        let fold = Folding {
            case: true,
            unicode: false,
        };
        let (ok, bad) = split_name_clashes(&l, acts, fold);
        assert_eq!(ok.len(), 1);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].path, "report.TXT");
        assert!(bad[0].reason.contains("case conflict"), "{}", bad[0].reason);
    }

    #[test]
    fn names_differing_only_by_normalisation_are_reported_where_the_filesystem_folds_them() {
        const NFC: &str = "caf\u{e9}.txt";
        const NFD: &str = "cafe\u{301}.txt";
        let new = || {
            plan(
                &HashMap::new(),
                vec![
                    (dev(2), rec(NFC, &[(2, 1)], 2, 20)),
                    (dev(2), rec(NFD, &[(2, 1)], 3, 20)),
                    (dev(2), rec("CAF\u{c9}.txt", &[(2, 1)], 4, 20)),
                ],
                None,
            )
        };
        let paths = |acts: &[Action]| -> Vec<String> {
            let mut v: Vec<String> = acts
                .iter()
                .map(|a| match a {
                    Action::Take { remote, .. } => remote.path.to_string(),
                    _ => unreachable!(),
                })
                .collect();
            v.sort();
            v
        };
        // macOS-like: the two forms are one name; case still tells apart.
        let macos = Folding {
            case: false,
            unicode: true,
        };
        let (ok, bad) = split_name_clashes(&HashMap::new(), new(), macos);
        assert_eq!(ok.len(), 2, "{:?}", paths(&ok));
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].reason.contains("unicode normalisation conflict"),
            "{}",
            bad[0].reason
        );
        // Case- and normalisation-insensitive: one of the three lands.
        let both = Folding {
            case: true,
            unicode: true,
        };
        let (ok, bad) = split_name_clashes(&HashMap::new(), new(), both);
        assert_eq!(ok.len(), 1);
        assert_eq!(bad.len(), 2);
        // A name already here in NFC: the NFD one from a peer is reported.
        let l = local(rec(NFC, &[(1, 1)], 1, 10));
        let acts = plan(&l, vec![(dev(2), rec(NFD, &[(2, 1)], 2, 20))], None);
        let (ok, bad) = split_name_clashes(&l, acts, macos);
        assert!(ok.is_empty());
        assert_eq!(bad[0].path, NFD);
    }

    #[test]
    fn peers_that_sent_corrupt_chunks_are_asked_last() {
        // Two good peers (0, 1) and one that sent a corrupt chunk (2).
        assert_eq!(ask_order(0, 2, 3), [0, 1, 0, 1, 2]);
        assert_eq!(ask_order(1, 2, 3), [1, 0, 1, 0, 2]);
        for n in 0..10 {
            let order = ask_order(n, 2, 3);
            assert_ne!(order[0], 2, "chunk {n} asks the bad peer first");
            assert_eq!(order.iter().filter(|&&i| i == 2).count(), 1);
        }
        // Only bad peers: each is still asked.
        assert_eq!(ask_order(5, 0, 2), [0, 0, 1]);
        // One peer: asked twice.
        assert_eq!(ask_order(3, 1, 1), [0, 0]);
        assert_eq!(ask_order(3, 0, 1), [0, 0]);
    }

    #[test]
    fn stages_put_parents_first_and_deletes_children_first() {
        let mut dir = rec("d", &[(1, 1)], 0, 0);
        dir.kind = FileKind::Dir;
        let file = rec("d/f", &[(1, 1)], 0, 0);
        let mut del_dir = rec("e", &[(1, 1)], 0, 0);
        del_dir.deleted = true;
        let mut del_child = rec("e/f", &[(1, 1)], 0, 0);
        del_child.deleted = true;
        let take = |r: RemoteFile| Action::Take {
            remote: Box::new(r),
            sources: vec![],
            local: None,
            version: VersionVector::new(),
            conflict: None,
        };
        let mut acts = [take(del_dir), take(file), take(del_child), take(dir)];
        order(&mut acts);
        let order: Vec<String> = acts
            .iter()
            .map(|a| match a {
                Action::Take { remote, .. } => remote.path.to_string(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(order, ["d", "d/f", "e/f", "e"]);
    }

    /// An old file of 1 MiB chunks and the jobs to copy them into a new one
    /// with `INSERT` bytes put in at `HALF` (the edit of a large file).
    fn shifted_copy_jobs(old: &Path, data: &[u8]) -> Vec<LocalCopy> {
        const MIB: usize = 1 << 20;
        data.chunks(MIB)
            .enumerate()
            .map(|(n, c)| {
                let offset = (n * MIB) as u64;
                let hash = ChunkHash(*blake3::hash(c).as_bytes());
                let to = if offset < HALF {
                    offset
                } else {
                    offset + INSERT
                };
                let place = ChunkInfo {
                    offset: to,
                    len: c.len() as u32,
                    hash,
                };
                let source = crate::index::ChunkSource {
                    path: old.to_path_buf(),
                    offset,
                    size: c.len() as u32,
                };
                (hash, vec![place], vec![source])
            })
            .collect()
    }
    const HALF: u64 = 20 << 20;
    const INSERT: u64 = 100;

    #[test]
    fn a_long_local_copy_lands_in_place_and_is_reported_in_steps() {
        let data = crate::chunking::pseudo_random(40 << 20, 3);
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        fs::write(&old, &data).unwrap();
        let (_d, new) = crate::disk::temp_rw_file(data.len() as u64 + INSERT);
        let reported = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = reported.clone();
        let marker = Marker::observed(move |o, l| r.lock().unwrap().push((o, l)));

        let missed = copy_local(&new, shifted_copy_jobs(&old, &data), false, &marker).unwrap();

        assert!(missed.is_empty());
        let mut got = vec![0u8; data.len() + INSERT as usize];
        new.read_exact_at(&mut got, 0).unwrap();
        let half = HALF as usize;
        assert_eq!(got[..half], data[..half]);
        assert_eq!(got[half + INSERT as usize..], data[half..]);
        // Two runs (before and after the insert), each reported in steps of
        // at most WRITEBACK_EVERY as they land, together covering both.
        let reported = reported.lock().unwrap().clone();
        assert!(reported.iter().all(|&(_, l)| l <= WRITEBACK_EVERY));
        assert!(reported.len() >= 4, "{reported:?}");
        let mut covered: Vec<(u64, u64)> = Vec::new();
        for (o, l) in reported {
            match covered.last_mut() {
                Some(last) if last.1 == o => last.1 = o + l,
                _ => covered.push((o, o + l)),
            }
        }
        let end = data.len() as u64 + INSERT;
        assert_eq!(covered, [(0, HALF), (HALF + INSERT, end)]);
    }

    #[test]
    fn a_local_copy_from_a_source_that_ended_early_misses_only_what_is_gone() {
        let data = crate::chunking::pseudo_random(40 << 20, 4);
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        // The source lost its last 10 MiB since it was indexed.
        let kept = 30 << 20;
        fs::write(&old, &data[..kept]).unwrap();
        let (_d, new) = crate::disk::temp_rw_file(data.len() as u64 + INSERT);

        let missed = copy_local(
            &new,
            shifted_copy_jobs(&old, &data),
            false,
            &Marker::default(),
        )
        .unwrap();

        // The chunks past the end are missed (to be fetched); the rest of
        // the run they were in is copied, checked, after all.
        let mut missed: Vec<u64> = missed.iter().map(|(_, p)| p[0].offset).collect();
        missed.sort_unstable();
        let want: Vec<u64> = (30..40).map(|n| (n << 20) + INSERT).collect();
        assert_eq!(missed, want);
        let mut got = vec![0u8; kept - HALF as usize];
        new.read_exact_at(&mut got, HALF + INSERT).unwrap();
        assert_eq!(got, data[HALF as usize..kept]);
    }
}
