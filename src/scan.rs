//! Finds local changes in a folder by walking it and records them in the index.
//!
//! A file whose size, mtime, inode and device match the index is not read again.
//! Changed files are hashed on `hash_threads` workers; a file that changes while
//! it is being hashed (its stat differs before and after) is tried again and,
//! if it keeps changing, left for a later scan rather than recorded with a hash
//! that matches no state it was ever in. Entries under a directory that could not
//! be read, and ignored entries, are never recorded as deleted. A large file
//! that changed is re-cut with the help of its recorded chunk list, which the
//! worker asks the scanning thread for (it holds the index).
//!
//! The agent hashes large files named by the watcher while its debounce runs
//! ([`prehash`]); a scan takes such a digest instead of reading the file again
//! when the file still shows the state (size, mtime, inode, device) it was
//! hashed in, which is what the scan trusts for every file it does not read.

use std::collections::HashMap;
use std::fs::{self, File, Metadata, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use serde::Serialize;

use crate::chunking::{
    ChunkInfo, ChunkParams, DEFAULT_PARAMS, FileDigest, ReuseStats, chunk_reader_reusing,
};
use crate::config::ScanConfig;
use crate::device::ShortId;
use crate::folder::{FolderError, check_root};
use crate::index::{Change, FileKind, FileMeta, Folder, Index, IndexError, Known, LocalChange};
use crate::relpath::{RelPath, RelPathError};

/// The ignore file at a folder root (gitignore syntax).
pub const IGNORE_FILE: &str = ".ferryignore";

/// How a scan runs.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Chunk sizes.
    pub params: ChunkParams,
    /// Files hashed at once.
    pub hash_threads: usize,
    /// Changes per index transaction.
    pub batch_files: usize,
    /// Extra attempts for a file that changes while hashed.
    pub changing_retries: u32,
    /// Hold deletes back above this percentage of the folder's entries...
    pub hold_deletes_percent: u32,
    /// ... when there are at least this many.
    pub hold_deletes_min: u64,
    /// Record held-back deletes now (`ferry folder confirm-deletes`).
    pub confirm_deletes: bool,
    /// Digests hashed ahead of this scan, to take where they still hold.
    pub prehashed: Option<Arc<Prehashed>>,
}

/// Digests of files hashed ahead of a scan ([`prehash`]), by path, each with
/// the state its file was in. A scan takes what it can use and drops the rest.
#[derive(Default)]
pub struct Prehashed(Mutex<PrehashedInner>);

#[derive(Default)]
struct PrehashedInner {
    /// Bumped by every [`Prehashed::clear`]: a hashing ahead that started
    /// before it stores nothing.
    generation: u64,
    files: HashMap<RelPath, (Metadata, FileDigest, ReuseStats)>,
}

impl std::fmt::Debug for Prehashed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.lock().files.len();
        write!(f, "Prehashed({n} files)")
    }
}

impl Prehashed {
    fn lock(&self) -> std::sync::MutexGuard<'_, PrehashedInner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn put(
        &self,
        generation: u64,
        path: RelPath,
        state: Metadata,
        digest: FileDigest,
        stats: ReuseStats,
    ) -> bool {
        let mut m = self.lock();
        if m.generation != generation {
            return false;
        }
        m.files.insert(path, (state, digest, stats));
        true
    }

    /// The digest of `path` if it was taken in the state `now` shows.
    fn take(&self, path: &RelPath, now: &Metadata) -> Option<(FileDigest, ReuseStats)> {
        let (state, digest, stats) = self.lock().files.remove(path)?;
        same_state(&state, now).then_some((digest, stats))
    }

    /// Forgets everything, and whatever a hashing ahead under way would
    /// still store: a scan has run (what it did not take is stale), or the
    /// watcher saw files change again after it named them.
    pub fn clear(&self) {
        let mut m = self.lock();
        m.generation += 1;
        m.files.clear();
    }
}

/// A reader that fails once `stop` says so.
struct Stoppable<'a, R> {
    inner: R,
    stop: &'a (dyn Fn() -> bool + Sync),
}

impl<R: std::io::Read> std::io::Read for Stoppable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if (self.stop)() {
            return Err(std::io::Error::other("stopped"));
        }
        self.inner.read(buf)
    }
}

/// Files from this size are hashed ahead; smaller ones hash in a few
/// milliseconds during the scan.
pub const PREHASH_MIN: u64 = 4 << 20;

/// Hashes, into `into`, those of `paths` (relative to `folder`'s root, as the
/// watcher saw them) that are regular files of at least [`PREHASH_MIN`] bytes,
/// not ignored, and not as the index last saw them: the work the next scan
/// would do for them, done while the watcher waits for quiet. Records
/// nothing. Stops early once `stop` says so (the agent is stopping). Returns
/// how many files were hashed.
pub fn prehash(
    index: &Index,
    folder: &Folder,
    paths: &[RelPath],
    params: ChunkParams,
    into: &Prehashed,
    stop: &(dyn Fn() -> bool + Sync),
) -> usize {
    let generation = into.lock().generation;
    let Ok(ignores) = load_ignores(&folder.path) else {
        return 0;
    };
    let mut hashed = 0;
    for path in paths {
        if stop() {
            break;
        }
        if ignores
            .matched_path_or_any_parents(path.as_str(), false)
            .is_ignore()
        {
            continue;
        }
        let abs = path.to_fs(&folder.path);
        // Only what looks like a regular file is opened (never a fifo or a
        // device), and only without following a link.
        match fs::symlink_metadata(&abs) {
            Ok(m) if m.is_file() && m.len() >= PREHASH_MIN => {}
            _ => continue,
        }
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&abs)
        else {
            continue;
        };
        let Ok(before) = file.metadata() else {
            continue;
        };
        if !before.is_file() || before.len() < PREHASH_MIN {
            continue;
        }
        let known = index.local_file(folder.row, path).ok().flatten();
        let old = match &known {
            Some(k) if as_recorded(&k.meta, &stat_meta(&before, FileKind::File)) => {
                // As the index has it: the scan will not read it.
                continue;
            }
            Some(k) if k.meta.kind == FileKind::File && before.len() >= REUSE_MIN => {
                index.file_chunks(folder.row, path).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        // No further than the size it had: a file still growing (a long
        // copy that paused) is not followed to its end, and fails the check.
        let bounded = Stoppable {
            inner: std::io::Read::take(&file, before.len() + 1),
            stop,
        };
        let Ok((digest, stats)) = chunk_reader_reusing(bounded, params, &old) else {
            continue;
        };
        if unchanged_since(&file, &abs, &before, digest.size)
            && into.put(generation, path.clone(), before, digest, stats)
        {
            hashed += 1;
        }
    }
    hashed
}

impl From<&ScanConfig> for ScanOptions {
    fn from(c: &ScanConfig) -> Self {
        Self {
            params: DEFAULT_PARAMS,
            hash_threads: c.hash_threads.max(1),
            batch_files: c.batch_files.max(1),
            changing_retries: c.changing_retries,
            hold_deletes_percent: c.hold_deletes_percent,
            hold_deletes_min: c.hold_deletes_min,
            confirm_deletes: false,
            prehashed: None,
        }
    }
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self::from(&ScanConfig::default())
    }
}

/// Receives progress while a scan runs (called from hashing threads too).
pub trait ScanProgress: Sync {
    /// The walk is done: this many files and bytes need hashing.
    fn hash_plan(&self, _files: u64, _bytes: u64) {}
    /// A file was read and hashed (before the check that it did not change).
    fn hashed(&self, _path: &Path, _bytes: u64) {}
}

/// Progress that goes nowhere.
pub struct NoProgress;
impl ScanProgress for NoProgress {}

/// A path the scan could not handle; the rest of the scan went on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScanIssue {
    /// The path, relative to the folder root where it could be made one.
    pub path: String,
    /// What went wrong.
    pub error: String,
}

/// What a scan found and recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScanReport {
    /// Entries walked.
    pub entries: u64,
    /// Paths recorded for the first time (or again after a delete).
    pub new: u64,
    /// Paths whose content or metadata changed.
    pub changed: u64,
    /// Paths recorded as deleted.
    pub deleted: u64,
    /// Deletes held back: too many at once (see `scan.hold_deletes_percent`).
    pub held_deletes: u64,
    /// Files read and hashed.
    pub hashed_files: u64,
    /// Bytes read and hashed.
    pub hashed_bytes: u64,
    /// Chunks of changed large files taken over from their previous chunk
    /// lists instead of being cut again.
    pub reused_chunks: u64,
    /// Of the files hashed, those hashed ahead of the scan, while the
    /// watcher's debounce ran (see [`prehash`]), and not read again.
    pub prehashed_files: u64,
    /// Files that kept changing while hashed; left for the next scan.
    pub changing: Vec<String>,
    /// Paths that could not be scanned.
    pub issues: Vec<ScanIssue>,
    /// Temp files of pulls that never finished, untouched for a day: the sync
    /// engine removes them (the scanner writes nothing into the folder).
    pub stale_temps: Vec<std::path::PathBuf>,
    /// The other temp files of pulls found: the sync engine removes those no
    /// pull still needs.
    pub temps: Vec<std::path::PathBuf>,
}

/// How long an untouched temp file of a pull is kept for a resume.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn is_temp(entry: &fs::DirEntry) -> bool {
    entry
        .file_name()
        .to_string_lossy()
        .starts_with(crate::relpath::TEMP_PREFIX)
}

fn is_stale_temp(entry: &fs::DirEntry) -> bool {
    use std::os::unix::fs::MetadataExt;
    is_temp(entry)
        && entry.metadata().is_ok_and(|m| {
            // ctime: set_modified gives a finished temp the remote's mtime.
            let age = crate::index::now_secs().saturating_sub(m.ctime());
            age >= STALE_TEMP.as_secs() as i64
        })
}

/// Why a scan stopped.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The folder root or marker is missing.
    #[error(transparent)]
    Folder(#[from] FolderError),
    /// The `.ferryignore` file is unreadable or has a bad pattern.
    #[error("{path}: {message}")]
    Ignore {
        /// The ignore file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The index refused a change.
    #[error(transparent)]
    Index(#[from] IndexError),
}

fn stat_meta(m: &Metadata, kind: FileKind) -> FileMeta {
    FileMeta {
        kind,
        size: if kind == FileKind::Dir { 0 } else { m.len() },
        mtime_ns: crate::disk::mtime_ns(m),
        permissions: if kind == FileKind::Symlink {
            0
        } else {
            m.mode() & 0o7777
        },
        inode: m.ino(),
        dev: m.dev(),
    }
}

fn kind_of(m: &Metadata) -> Option<FileKind> {
    let t = m.file_type();
    if t.is_symlink() {
        Some(FileKind::Symlink)
    } else if t.is_dir() {
        Some(FileKind::Dir)
    } else if t.is_file() {
        Some(FileKind::File)
    } else {
        None
    }
}

fn load_ignores(root: &Path) -> Result<Gitignore, ScanError> {
    let path = root.join(IGNORE_FILE);
    let text = match fs::read(&path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(ScanError::Ignore {
                path,
                message: e.to_string(),
            });
        }
    };
    ignore_matcher(root, &text).map_err(|(line, message)| ScanError::Ignore {
        path,
        message: format!("line {line}: {message}"),
    })
}

/// Builds the matcher for a folder's `.ferryignore` text (gitignore syntax).
/// A bad pattern is reported with its 1-based line number.
pub fn ignore_matcher(root: &Path, text: &str) -> Result<Gitignore, (usize, String)> {
    let mut builder = GitignoreBuilder::new(root);
    for (i, line) in text.lines().enumerate() {
        builder
            .add_line(None, line)
            .map_err(|e| (i + 1, e.to_string()))?;
    }
    builder.build().map_err(|e| (0, e.to_string()))
}

struct HashJob {
    path: RelPath,
    size: u64,
    known: Option<Known>,
}

/// From 4 MiB, a changed file is re-cut with its old chunk list (see
/// `chunking::chunk_reader_reusing`); below, the index read costs about what it
/// saves.
const REUSE_MIN: u64 = 4 << 20;

/// What a hashing worker hands the scanning thread.
enum FromWorker {
    Outcome(HashOutcome),
    /// The chunk list the index has for a path, wanted back on the sender.
    OldChunks(RelPath, SyncSender<Vec<ChunkInfo>>),
}

enum HashOutcome {
    Done {
        change: LocalChange,
        is_new: bool,
        reused: u64,
        /// Hashed ahead of the scan (see [`prehash`]).
        ahead: bool,
    },
    Changing(RelPath),
    Gone(RelPath),
    Failed(RelPath, std::io::Error),
}

/// Scans `folder`, records what changed, and returns a report.
pub fn scan(
    index: &mut Index,
    folder: &Folder,
    me: ShortId,
    opts: &ScanOptions,
    progress: &dyn ScanProgress,
) -> Result<ScanReport, ScanError> {
    if let Err(e) = check_root(folder) {
        index.set_scan_result(folder.row, Some(&e.to_string()))?;
        return Err(e.into());
    }
    let root = folder.path.as_path();
    let ignores = match load_ignores(root) {
        Ok(i) => i,
        Err(e) => {
            index.set_scan_result(folder.row, Some(&e.to_string()))?;
            return Err(e);
        }
    };
    let mut known = index.scan_snapshot(folder.row)?;
    let mut report = ScanReport::default();
    let mut batch = Batch {
        index,
        folder: folder.row,
        me,
        pending: Vec::new(),
        limit: opts.batch_files,
    };
    let mut jobs = Vec::new();
    let mut unreadable: Vec<RelPath> = Vec::new();
    // The root itself could not be listed (fully or partly): then nothing
    // missing from this scan may be taken as deleted.
    let mut root_unreadable = false;

    let mut stack: Vec<Option<RelPath>> = vec![None];
    while let Some(dir) = stack.pop() {
        let abs = dir
            .as_ref()
            .map_or_else(|| root.to_owned(), |d| d.to_fs(root));
        let entries = match fs::read_dir(&abs) {
            Ok(e) => e,
            Err(e) => {
                report
                    .issues
                    .push(issue(dir.as_ref(), &abs, &e.to_string()));
                match dir {
                    Some(d) => unreadable.push(d),
                    None => root_unreadable = true,
                }
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    report
                        .issues
                        .push(issue(dir.as_ref(), &abs, &e.to_string()));
                    match &dir {
                        Some(d) => unreadable.push(d.clone()),
                        None => root_unreadable = true,
                    }
                    continue;
                }
            };
            let rel = match RelPath::join(dir.as_ref(), &entry.file_name()) {
                Ok(r) => r,
                Err(RelPathError::Reserved(_)) => {
                    if is_stale_temp(&entry) {
                        report.stale_temps.push(entry.path());
                    } else if is_temp(&entry) {
                        report.temps.push(entry.path());
                    }
                    continue;
                }
                Err(e) => {
                    report.issues.push(ScanIssue {
                        path: entry.path().display().to_string(),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) => {
                    // Vanished between readdir and stat: the next scan settles it.
                    known.remove(rel.as_str());
                    report.issues.push(ScanIssue {
                        path: rel.to_string(),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let Some(kind) = kind_of(&meta) else {
                tracing::debug!(path = %rel, "skipping a socket, fifo or device node");
                continue;
            };
            if ignores
                .matched(rel.as_str(), kind == FileKind::Dir)
                .is_ignore()
            {
                continue;
            }
            report.entries += 1;
            let old = known.remove(rel.as_str()).filter(|k| !k.deleted);
            let now = stat_meta(&meta, kind);
            let is_new = old.as_ref().is_none_or(|k| k.meta.kind != kind);
            let change = match kind {
                FileKind::Dir => {
                    stack.push(Some(rel.clone()));
                    match &old {
                        Some(k) if !is_new && k.meta.permissions == now.permissions => None,
                        _ => Some(Change::Dir),
                    }
                }
                FileKind::Symlink => {
                    let target = match fs::read_link(entry.path()) {
                        Ok(t) => t,
                        Err(e) => {
                            report
                                .issues
                                .push(issue(Some(&rel), &entry.path(), &e.to_string()));
                            continue;
                        }
                    };
                    let Some(target) = target.to_str().map(str::to_owned) else {
                        report.issues.push(ScanIssue {
                            path: rel.to_string(),
                            error: "symlink target is not valid UTF-8".into(),
                        });
                        continue;
                    };
                    match &old {
                        Some(k) if !is_new && k.symlink_target.as_deref() == Some(&target) => None,
                        _ => Some(Change::Symlink(target)),
                    }
                }
                FileKind::File => match &old {
                    Some(k) if !is_new && as_recorded(&k.meta, &now) => {
                        (k.meta.permissions != now.permissions).then_some(Change::Metadata)
                    }
                    _ => {
                        jobs.push(HashJob {
                            path: rel.clone(),
                            size: now.size,
                            known: old.clone().filter(|k| k.meta.kind == FileKind::File),
                        });
                        None
                    }
                },
            };
            if let Some(change) = change {
                count(&mut report, is_new);
                batch.push(LocalChange {
                    path: rel,
                    meta: now,
                    change,
                })?;
            }
        }
    }

    progress.hash_plan(jobs.len() as u64, jobs.iter().map(|j| j.size).sum());
    hash_all(
        root,
        jobs,
        opts,
        progress,
        &mut batch,
        |batch, outcome| match outcome {
            HashOutcome::Done {
                change,
                is_new,
                reused,
                ahead,
            } => {
                report.hashed_files += 1;
                report.prehashed_files += u64::from(ahead);
                report.reused_chunks += reused;
                report.hashed_bytes += change.meta.size;
                if change.change != Change::Refresh {
                    count(&mut report, is_new);
                }
                batch.push(change)
            }
            HashOutcome::Changing(p) => {
                report.changing.push(p.to_string());
                Ok(())
            }
            HashOutcome::Gone(p) => {
                tracing::debug!(path = %p, "vanished before it could be hashed; the next scan records it");
                Ok(())
            }
            HashOutcome::Failed(p, e) => {
                report.issues.push(ScanIssue {
                    path: p.to_string(),
                    error: e.to_string(),
                });
                Ok(())
            }
        },
    )?;

    let live = known.values().filter(|k| !k.deleted).count() as u64;
    let mut deletes = Vec::new();
    for (path, k) in known {
        if k.deleted {
            continue;
        }
        let Ok(rel) = RelPath::new(&path) else {
            continue;
        };
        let protected = root_unreadable
            || unreadable.iter().any(|d| rel.starts_with(d))
            || ignores
                .matched_path_or_any_parents(rel.as_str(), k.meta.kind == FileKind::Dir)
                .is_ignore();
        if protected {
            continue;
        }
        deletes.push(LocalChange {
            path: rel,
            meta: k.meta,
            change: Change::Deleted,
        });
    }
    let n = deletes.len() as u64;
    if !opts.confirm_deletes
        && n >= opts.hold_deletes_min.max(1)
        && n * 100 > live * opts.hold_deletes_percent as u64
    {
        report.held_deletes = n;
    } else {
        report.deleted = n;
        for d in deletes {
            batch.push(d)?;
        }
    }
    batch.flush()?;
    batch
        .index
        .set_held_deletes(folder.row, report.held_deletes)?;
    batch.index.set_scan_result(folder.row, None)?;
    Ok(report)
}

fn count(report: &mut ScanReport, is_new: bool) {
    if is_new {
        report.new += 1;
    } else {
        report.changed += 1;
    }
}

fn issue(dir: Option<&RelPath>, abs: &Path, error: &str) -> ScanIssue {
    ScanIssue {
        path: dir.map_or_else(|| abs.display().to_string(), |d| d.to_string()),
        error: error.to_owned(),
    }
}

/// Collects changes and writes them to the index a transaction at a time.
struct Batch<'a> {
    index: &'a mut Index,
    folder: i64,
    me: ShortId,
    pending: Vec<LocalChange>,
    limit: usize,
}

impl Batch<'_> {
    fn push(&mut self, c: LocalChange) -> Result<(), IndexError> {
        self.pending.push(c);
        if self.pending.len() >= self.limit {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IndexError> {
        if !self.pending.is_empty() {
            self.index
                .apply_local_changes(self.folder, self.me, &self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }
}

/// Hashes every job on `opts.hash_threads` workers, handing each outcome to
/// `sink` on the calling thread in completion order, and answering the
/// workers' requests for old chunk lists from the index in between.
fn hash_all(
    root: &Path,
    jobs: Vec<HashJob>,
    opts: &ScanOptions,
    progress: &dyn ScanProgress,
    batch: &mut Batch<'_>,
    mut sink: impl FnMut(&mut Batch<'_>, HashOutcome) -> Result<(), IndexError>,
) -> Result<(), IndexError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let next = AtomicUsize::new(0);
    let threads = opts.hash_threads.min(jobs.len());
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel(64);
        for _ in 0..threads {
            let tx = tx.clone();
            let (jobs, next) = (&jobs, &next);
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let outcome = hash_one(root, job, opts, progress, &tx);
                    if tx.send(FromWorker::Outcome(outcome)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut result = Ok(());
        for msg in rx {
            match msg {
                FromWorker::OldChunks(path, reply) => {
                    // Without a list the file is simply cut afresh.
                    let list = batch
                        .index
                        .file_chunks(batch.folder, &path)
                        .unwrap_or_else(|e| {
                            tracing::debug!(path = %path, error = %e, "no old chunk list to reuse");
                            Vec::new()
                        });
                    let _ = reply.send(list);
                }
                FromWorker::Outcome(outcome) if result.is_ok() => {
                    result = sink(batch, outcome);
                    if result.is_err() {
                        // Stop handing out work; the workers finish their current file.
                        next.store(usize::MAX / 2, Ordering::Relaxed);
                    }
                }
                FromWorker::Outcome(_) => {}
            }
        }
        result
    })
}

/// Whether a file's stat `now` matches what the index recorded: then it is
/// not read again.
fn as_recorded(recorded: &FileMeta, now: &FileMeta) -> bool {
    recorded.size == now.size
        && recorded.mtime_ns == now.mtime_ns
        && recorded.inode == now.inode
        && recorded.dev == now.dev
}

fn same_state(a: &Metadata, b: &Metadata) -> bool {
    a.len() == b.len()
        && a.mtime() == b.mtime()
        && a.mtime_nsec() == b.mtime_nsec()
        && a.ino() == b.ino()
        && a.dev() == b.dev()
}

fn hash_one(
    root: &Path,
    job: &HashJob,
    opts: &ScanOptions,
    progress: &dyn ScanProgress,
    scanner: &SyncSender<FromWorker>,
) -> HashOutcome {
    let abs = job.path.to_fs(root);
    // Asked for only when the file is read here, not taken as hashed ahead.
    let old_chunks = || match &job.known {
        Some(k) if k.hash.is_some() && job.size >= REUSE_MIN => {
            let (tx, rx) = sync_channel(1);
            let asked = scanner.send(FromWorker::OldChunks(job.path.clone(), tx));
            asked.ok().and_then(|()| rx.recv().ok()).unwrap_or_default()
        }
        _ => Vec::new(),
    };
    let mut old: Option<Vec<ChunkInfo>> = None;
    for attempt in 0..=opts.changing_retries {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(50 << attempt.min(5)));
        }
        // O_NOFOLLOW: if the file was swapped for a symlink since the walk, fail
        // instead of hashing whatever the link points at.
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&abs)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return HashOutcome::Gone(job.path.clone());
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return HashOutcome::Changing(job.path.clone());
            }
            Err(e) => return HashOutcome::Failed(job.path.clone(), e),
        };
        let before = match file.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => return HashOutcome::Changing(job.path.clone()),
            Err(e) => return HashOutcome::Failed(job.path.clone(), e),
        };
        let ahead = opts
            .prehashed
            .as_ref()
            .and_then(|p| p.take(&job.path, &before));
        let taken = ahead.is_some();
        let (digest, stats) = match ahead {
            Some(d) => d,
            None => {
                match chunk_reader_reusing(&file, opts.params, old.get_or_insert_with(old_chunks)) {
                    Ok(d) => d,
                    Err(e) => return HashOutcome::Failed(job.path.clone(), e),
                }
            }
        };
        progress.hashed(&abs, digest.size);
        if !unchanged_since(&file, &abs, &before, digest.size) {
            tracing::debug!(path = %job.path, attempt, "file changed while being hashed");
            continue;
        }
        let meta = stat_meta(&before, FileKind::File);
        let change = match &job.known {
            Some(k) if k.hash == Some(digest.hash) => {
                if k.meta.mtime_ns == meta.mtime_ns && k.meta.permissions == meta.permissions {
                    Change::Refresh
                } else {
                    Change::Metadata
                }
            }
            _ => Change::Content {
                hash: digest.hash,
                chunks: digest.chunks,
            },
        };
        return HashOutcome::Done {
            change: LocalChange {
                path: job.path.clone(),
                meta,
                change,
            },
            is_new: job.known.is_none(),
            reused: stats.reused,
            ahead: taken,
        };
    }
    HashOutcome::Changing(job.path.clone())
}

/// Whether the open file and the path still show the state seen before hashing,
/// and hashing read exactly its size.
fn unchanged_since(file: &File, abs: &Path, before: &Metadata, read: u64) -> bool {
    let (Ok(after), Ok(path_now)) = (file.metadata(), fs::symlink_metadata(abs)) else {
        return false;
    };
    read == before.len() && same_state(before, &after) && same_state(before, &path_now)
}
