//! Restoring: choosing what to restore ([`plan`]: a version by id, the newest
//! one, or what a path or a whole tree held at a time), reading it back
//! hash-verified from the chunk store or its pending file, and writing it
//! atomically: in place ([`restore_in_place`], the version it replaces kept in
//! the history first) or elsewhere ([`restore_to`]).
//!
//! Every file is assembled in a temp file on the destination's filesystem
//! (named with [`TEMP_PREFIX`], so a scan never takes it for a synced file),
//! checked against the version's blake3 hash, given its permissions and mtime,
//! fsynced, and only then renamed into place; a tree is staged completely
//! before the first rename, so a damaged chunk changes nothing.

use crate::disk::system_time;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::store::{ChunkStore, StoreError};
use super::time::format_utc;
use super::{HistoryError, Result, io_at, pending_file, random_suffix, sync_dir, versions_dir};
use crate::chunking::{ChunkInfo, FileHash};
use crate::folder::{check_root, temp_dir};
use crate::index::{
    FileKind, Folder, HistoryReason, HistoryTx, HistoryVersion, Index, LocalFile, PathAt,
};
use crate::relpath::{RelPath, TEMP_PREFIX};

/// Which version to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The newest version kept.
    Newest,
    /// A version by id.
    Version(i64),
    /// What was current at this time (Unix seconds).
    At(i64),
}

/// Where the content to restore comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A version in the history.
    Version(Box<HistoryVersion>),
    /// The current file (unchanged since the time asked for).
    Live(Box<LocalFile>),
}

impl Source {
    /// The history id, for versions.
    pub fn version_id(&self) -> Option<i64> {
        match self {
            Source::Version(v) => Some(v.id),
            Source::Live(_) => None,
        }
    }

    fn kind(&self) -> FileKind {
        match self {
            Source::Version(v) => v.kind,
            Source::Live(l) => l.record.kind,
        }
    }

    /// Bytes.
    pub fn size(&self) -> u64 {
        match self {
            Source::Version(v) => v.size,
            Source::Live(l) => l.record.size,
        }
    }

    fn hash(&self) -> Option<FileHash> {
        match self {
            Source::Version(v) => v.hash,
            Source::Live(l) => l.record.hash,
        }
    }

    fn mtime_ns(&self) -> i64 {
        match self {
            Source::Version(v) => v.mtime_ns,
            Source::Live(l) => l.record.mtime_ns,
        }
    }

    fn permissions(&self) -> u32 {
        match self {
            Source::Version(v) => v.permissions,
            Source::Live(l) => l.record.permissions,
        }
    }

    fn symlink_target(&self) -> Option<&str> {
        match self {
            Source::Version(v) => v.symlink_target.as_deref(),
            Source::Live(l) => l.record.symlink_target.as_deref(),
        }
    }

    /// Whether the live record `now` already has this content.
    fn same_as(&self, now: &LocalFile) -> bool {
        !now.record.deleted
            && now.record.kind == self.kind()
            && match self.kind() {
                FileKind::File => now.record.hash == self.hash(),
                FileKind::Symlink => now.record.symlink_target.as_deref() == self.symlink_target(),
                FileKind::Dir => true,
            }
    }
}

/// One path to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The path in the folder.
    pub path: RelPath,
    /// What goes there.
    pub source: Source,
}

/// What a restore will do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The paths to restore.
    pub items: Vec<Item>,
    /// Paths that hold something now but nothing kept from the time asked
    /// for (made or changed later): left as they are, with why.
    pub left: Vec<(RelPath, String)>,
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    /// Paths written.
    pub restored: Vec<Restored>,
    /// Paths that already held that content.
    pub unchanged: Vec<String>,
    /// Paths left as they are, with why.
    pub left: Vec<LeftAlone>,
}

/// A path written by a restore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Restored {
    /// The path in the folder.
    pub path: String,
    /// The history id restored (`None`: the current file, copied).
    pub version: Option<i64>,
    /// Bytes.
    pub size: u64,
    /// The history id the replaced version was kept under, if one was.
    pub kept: Option<i64>,
    /// Where it was written.
    pub written_to: PathBuf,
}

/// A path a restore left alone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeftAlone {
    /// The path in the folder.
    pub path: String,
    /// Why.
    pub reason: String,
}

fn path_name(folder: &Folder, path: Option<&RelPath>) -> String {
    match path {
        Some(p) => format!("{}:{p}", folder.id),
        None => format!("{}:", folder.id),
    }
}

/// Decides what to restore at `path` (the folder root when `None`). A
/// directory needs `recursive` and `Pick::At`: the tree as it was then,
/// deleted files included; paths that were made or changed later without a
/// kept version are left as they are.
pub fn plan(
    index: &Index,
    folder: &Folder,
    path: Option<&RelPath>,
    pick: Pick,
    recursive: bool,
) -> Result<Plan> {
    let name = path_name(folder, path);
    if recursive {
        let Pick::At(at) = pick else {
            return Err(HistoryError::Refused(
                "--recursive restores a tree as it was at a time: give --at TIME".into(),
            ));
        };
        let mut plan = Plan::default();
        for e in index.tree_at(folder.row, path, at)? {
            match e.state {
                PathAt::Version(v) => plan.items.push(Item {
                    path: e.path,
                    source: Source::Version(v),
                }),
                PathAt::Current(l) => plan.items.push(Item {
                    path: e.path,
                    source: Source::Live(l),
                }),
                PathAt::Missing if e.exists_now => plan.left.push((
                    e.path,
                    format!(
                        "made or changed after {} UTC with no version kept from then",
                        format_utc(at)
                    ),
                )),
                PathAt::Missing => {}
            }
        }
        if plan.items.is_empty() {
            return Err(HistoryError::NoVersionAt {
                path: name,
                at: format_utc(at),
            });
        }
        return Ok(plan);
    }
    let Some(path) = path else {
        return Err(HistoryError::Refused(format!(
            "{name} is a folder: restore the tree as it was at a time with --recursive --at TIME"
        )));
    };
    let is_dir = index
        .local_file(folder.row, path)?
        .is_some_and(|l| !l.record.deleted && l.record.kind == FileKind::Dir);
    if is_dir {
        return Err(HistoryError::Refused(format!(
            "{name} is a directory: restore the tree as it was at a time with --recursive --at TIME"
        )));
    }
    let source = match pick {
        Pick::Newest => {
            let v = index
                .history_of(folder.row, Some(path), false)?
                .into_iter()
                .find(|v| v.kind != FileKind::Dir)
                .ok_or_else(|| HistoryError::NoHistory(name.clone()))?;
            Source::Version(Box::new(v))
        }
        Pick::Version(id) => {
            let v = index
                .history_version(id)?
                .ok_or(HistoryError::UnknownVersion(id))?;
            if v.folder != folder.row || &v.path != path {
                let actual = if v.folder == folder.row {
                    format!("{}:{}", folder.id, v.path)
                } else {
                    format!("{} in another folder", v.path)
                };
                return Err(HistoryError::OtherPath {
                    id,
                    actual,
                    wanted: name,
                });
            }
            if v.kind == FileKind::Dir {
                return Err(HistoryError::Refused(format!(
                    "version {id} of {name} is a directory: it has no content to restore"
                )));
            }
            Source::Version(Box::new(v))
        }
        Pick::At(at) => {
            let entry = index
                .tree_at(folder.row, Some(path), at)?
                .into_iter()
                .find(|e| &e.path == path);
            match entry.map(|e| e.state) {
                Some(PathAt::Version(v)) => Source::Version(v),
                Some(PathAt::Current(l)) => Source::Live(l),
                _ => {
                    return Err(HistoryError::NoVersionAt {
                        path: name,
                        at: format_utc(at),
                    });
                }
            }
        }
    };
    Ok(Plan {
        items: vec![Item {
            path: path.clone(),
            source,
        }],
        left: Vec::new(),
    })
}

/// Whether restoring `plan` in place would change nothing (every path
/// already holds what it would get).
pub fn changes_nothing(index: &Index, folder: &Folder, plan: &Plan) -> Result<bool> {
    for item in &plan.items {
        if matches!(item.source, Source::Live(_)) {
            continue;
        }
        let now = index.local_file(folder.row, &item.path)?;
        if !now.as_ref().is_some_and(|n| item.source.same_as(n)) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Writes a version's bytes to `out`, each chunk checked against its hash and
/// the whole against the version's hash. Reads the pending file while there is
/// one, else the chunk store.
pub fn copy_version(
    index: &Index,
    store: &ChunkStore,
    root: &Path,
    v: &HistoryVersion,
    out: &mut dyn Write,
) -> Result<()> {
    let damaged = |detail: String| HistoryError::Damaged {
        id: v.id,
        path: v.path.to_string(),
        detail,
    };
    let chunks = index.history_chunks(v.id)?;
    check_layout(&chunks, v.size).map_err(damaged)?;
    let mut hasher = blake3::Hasher::new();
    let mut stored = v.stored;
    if !stored {
        match File::open(pending_file(root, v.id)) {
            Ok(f) => {
                let mut r = BufReader::with_capacity(1 << 20, f);
                let mut buf = Vec::new();
                for c in &chunks {
                    buf.resize(c.len as usize, 0);
                    r.read_exact(&mut buf)
                        .map_err(|e| damaged(format!("its pending file ends early ({e})")))?;
                    if blake3::hash(&buf).as_bytes() != &c.hash.0 {
                        return Err(damaged(
                            "its pending file does not match the version's chunks".into(),
                        ));
                    }
                    hasher.update(&buf);
                    out.write_all(&buf).map_err(write_err)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Moved into the store since the row was read?
                stored = index.history_version(v.id)?.is_some_and(|v| v.stored);
                if !stored {
                    return Err(damaged("its pending file is missing".into()));
                }
            }
            Err(e) => return Err(io_at(&pending_file(root, v.id))(e)),
        }
    }
    if stored {
        let mut reader = store.reader()?;
        let mut located = HashMap::new();
        for c in &chunks {
            let loc = match located.get(&c.hash) {
                Some(l) => l,
                None => {
                    let l = index
                        .store_locate(&c.hash)?
                        .ok_or_else(|| damaged(format!("chunk {} is not in the store", c.hash)))?;
                    located.entry(c.hash).or_insert(l)
                }
            };
            let data = reader.read_at(&c.hash, loc).map_err(|e| match e {
                StoreError::Damaged { .. } => damaged(e.to_string()),
                other => other.into(),
            })?;
            hasher.update(&data);
            out.write_all(&data).map_err(write_err)?;
        }
    }
    if v.hash.is_some_and(|h| h.0 != *hasher.finalize().as_bytes()) {
        return Err(damaged("the bytes read do not have its hash".into()));
    }
    Ok(())
}

/// One chunk of a version, hash-checked: from its pending file while there is
/// one, else from the chunk store (what a peer asking for the version reads).
pub fn read_version_chunk(
    index: &Index,
    store: &ChunkStore,
    root: &Path,
    v: &HistoryVersion,
    chunk: &ChunkInfo,
) -> Result<Vec<u8>> {
    if !v.stored {
        use std::os::unix::fs::FileExt;
        if let Ok(f) = File::open(pending_file(root, v.id)) {
            let mut buf = vec![0u8; chunk.len as usize];
            if f.read_exact_at(&mut buf, chunk.offset).is_ok()
                && blake3::hash(&buf).as_bytes() == &chunk.hash.0
            {
                return Ok(buf);
            }
        }
    }
    Ok(store.read_chunk(index, &chunk.hash)?)
}

fn write_err(e: io::Error) -> HistoryError {
    HistoryError::Io {
        path: PathBuf::from("(restore output)"),
        source: e,
    }
}

/// Checks that chunks cover `0..size` in order.
pub(super) fn check_layout(chunks: &[ChunkInfo], size: u64) -> std::result::Result<(), String> {
    let mut offset = 0u64;
    for c in chunks {
        if c.offset != offset {
            return Err("its chunk list has a gap".into());
        }
        offset += c.len as u64;
    }
    if offset != size {
        return Err(format!(
            "its chunks add up to {offset} bytes, not its {size}"
        ));
    }
    Ok(())
}

/// Copies the current file, checked against the hash its record holds.
fn copy_live(root: &Path, l: &LocalFile, out: &mut dyn Write) -> Result<()> {
    let path = l.record.path.to_fs(root);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_at(&path))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(io_at(&path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(write_err)?;
    }
    if l.record
        .hash
        .is_some_and(|h| h.0 != *hasher.finalize().as_bytes())
    {
        return Err(HistoryError::LocalChanged(l.record.path.to_string()));
    }
    Ok(())
}

/// A fresh name for a temp file of a restore in `dir` (one a scan skips and the
/// agent's start-up sweep removes if a restore is interrupted).
pub fn temp_path(dir: &Path) -> PathBuf {
    dir.join(format!("{TEMP_PREFIX}restore-{}.part", random_suffix()))
}

/// A temp file (or link) holding restored content, removed on drop unless
/// renamed away.
pub(super) struct Staged {
    pub(super) tmp: PathBuf,
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Writes `source` to a new temp file in `dir`: verified, with its permissions
/// and mtime, fsynced.
pub(super) fn stage(
    index: &Index,
    store: &ChunkStore,
    root: &Path,
    source: &Source,
    dir: &Path,
) -> Result<Staged> {
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    let staged = Staged {
        tmp: temp_path(dir),
    };
    let tmp = &staged.tmp;
    match source.kind() {
        FileKind::Symlink => {
            let target = source.symlink_target().unwrap_or_default();
            std::os::unix::fs::symlink(target, tmp).map_err(io_at(tmp))?;
        }
        FileKind::Dir => {
            return Err(HistoryError::Refused(
                "a directory has no content to restore".into(),
            ));
        }
        FileKind::File => {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp)
                .map_err(io_at(tmp))?;
            let mut w = BufWriter::with_capacity(4 << 20, file);
            match source {
                Source::Version(v) => copy_version(index, store, root, v, &mut w)?,
                Source::Live(l) => copy_live(root, l, &mut w)?,
            }
            let file = w.into_inner().map_err(|e| io_at(tmp)(e.into_error()))?;
            fs::set_permissions(tmp, fs::Permissions::from_mode(source.permissions()))
                .map_err(io_at(tmp))?;
            file.set_modified(system_time(source.mtime_ns()))
                .map_err(io_at(tmp))?;
            file.sync_all().map_err(io_at(tmp))?;
        }
    }
    Ok(staged)
}

/// Renames done inside a transaction, undone in reverse if it does not commit.
#[derive(Default)]
pub(super) struct Moves {
    done: Vec<(PathBuf, PathBuf)>,
    dirs: HashSet<PathBuf>,
}

impl Moves {
    pub(super) fn rename(&mut self, from: &Path, to: &Path) -> Result<()> {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        fs::rename(from, to).map_err(io_at(to))?;
        self.done.push((to.to_owned(), from.to_owned()));
        for p in [from, to] {
            if let Some(d) = p.parent() {
                self.dirs.insert(d.to_owned());
            }
        }
        Ok(())
    }

    /// Puts everything back where it was (best effort: this runs on an error path).
    pub(super) fn undo(self) {
        for (now, was) in self.done.into_iter().rev() {
            if let Err(e) = fs::rename(&now, &was) {
                tracing::error!(
                    "could not move {} back to {}: {e}",
                    now.display(),
                    was.display()
                );
            }
        }
    }

    /// Makes the renames durable.
    pub(super) fn finish(self) {
        for d in self.dirs {
            let _ = sync_dir(&d);
        }
    }
}

/// Checks that what is on disk at `path` is what the index last recorded
/// (nothing, when there is no live record), so nothing unrecorded is lost.
pub(super) fn check_disk(root: &Path, path: &RelPath, now: Option<&LocalFile>) -> Result<()> {
    let target = path.to_fs(root);
    let on_disk = fs::symlink_metadata(&target).ok();
    let live = now.filter(|l| !l.record.deleted);
    let same = match (live, &on_disk) {
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some(l), Some(m)) => match l.record.kind {
            FileKind::Dir => m.is_dir(),
            FileKind::File => {
                m.is_file()
                    && m.len() == l.meta.size
                    && m.ino() == l.meta.inode
                    && crate::disk::mtime_ns(m) == l.meta.mtime_ns
            }
            FileKind::Symlink => {
                m.file_type().is_symlink()
                    && fs::read_link(&target)
                        .ok()
                        .and_then(|t| t.to_str().map(str::to_owned))
                        == l.record.symlink_target
            }
        },
    };
    if same {
        Ok(())
    } else {
        Err(HistoryError::LocalChanged(path.to_string()))
    }
}

/// Creates the missing parents of `rel` under `root`, refusing a parent that
/// is a symlink or not a directory (which would let a write escape the folder).
pub(super) fn ensure_parents(root: &Path, rel: &RelPath) -> Result<()> {
    let mut dir = root.to_path_buf();
    let parts: Vec<&str> = rel.as_str().split('/').collect();
    for part in &parts[..parts.len() - 1] {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(HistoryError::Refused(format!(
                    "{} is not a directory (a symlink?); move it away first",
                    dir.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&dir).map_err(io_at(&dir))?
            }
            Err(e) => return Err(io_at(&dir)(e)),
        }
    }
    Ok(())
}

/// Moves whatever the live record at `path` is out of the way inside `tx`:
/// kept as a version that left for `reason` (files with bytes to
/// `.ferry/versions/<id>`, links and empty files to a temp name removed after
/// the commit). Returns the history id.
pub(super) fn set_aside(
    tx: &HistoryTx<'_>,
    moves: &mut Moves,
    doomed: &mut Vec<PathBuf>,
    folder: &Folder,
    path: &RelPath,
    reason: HistoryReason,
) -> Result<Option<i64>> {
    let root = &folder.path;
    let Some(kept) = tx.supersede(folder.row, path, reason)? else {
        return Ok(None);
    };
    let target = path.to_fs(root);
    if kept.move_file {
        let dir = versions_dir(root);
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        moves.rename(&target, &pending_file(root, kept.id))?;
    } else {
        let away = temp_dir(root).join(format!("{TEMP_PREFIX}old-{}", random_suffix()));
        moves.rename(&target, &away)?;
        doomed.push(away);
    }
    Ok(Some(kept.id))
}

/// Restores in place, as one transaction: every version replaced is kept in
/// the history first (`restored-over`). The caller holds the folder's disk
/// lock and rescans afterwards, so each restore becomes a local change that
/// syncs. Paths whose content is already right are left alone; a file changed
/// on disk since the last scan stops the whole restore.
pub fn restore_in_place(
    index: &mut Index,
    store: &ChunkStore,
    folder: &Folder,
    plan: Plan,
    done: &dyn Fn(u64),
) -> Result<Outcome> {
    check_root(folder)?;
    let root = &folder.path;
    let mut out = Outcome {
        left: left(plan.left),
        ..Outcome::default()
    };
    let mut todo = Vec::new();
    for item in plan.items {
        let now = index.local_file(folder.row, &item.path)?;
        if matches!(item.source, Source::Live(_))
            || now.as_ref().is_some_and(|n| item.source.same_as(n))
        {
            out.unchanged.push(item.path.to_string());
            continue;
        }
        if now
            .as_ref()
            .is_some_and(|n| !n.record.deleted && n.record.kind == FileKind::Dir)
        {
            return Err(HistoryError::Refused(format!(
                "{}:{} is a directory now; move it away first",
                folder.id, item.path
            )));
        }
        check_disk(root, &item.path, now.as_ref())?;
        todo.push(item);
    }
    // Everything staged (and so read back intact) before anything moves.
    let tmp = temp_dir(root);
    let mut staged = Vec::with_capacity(todo.len());
    for item in &todo {
        staged.push(stage(index, store, root, &item.source, &tmp)?);
        done(item.source.size());
    }
    for item in &todo {
        ensure_parents(root, &item.path)?;
    }
    let mut moves = Moves::default();
    let mut doomed = Vec::new();
    let tx = index.history_tx()?;
    let mut done = Vec::new();
    let result = (|| {
        for (item, s) in todo.iter().zip(&staged) {
            let kept = set_aside(
                &tx,
                &mut moves,
                &mut doomed,
                folder,
                &item.path,
                HistoryReason::RestoredOver,
            )?;
            let target = item.path.to_fs(root);
            moves.rename(&s.tmp, &target)?;
            done.push(Restored {
                path: item.path.to_string(),
                version: item.source.version_id(),
                size: item.source.size(),
                kept,
                written_to: target,
            });
        }
        Ok(())
    })();
    if let Err(e) = result.and_then(|()| Ok(tx.commit()?)) {
        moves.undo();
        return Err(e);
    }
    moves.finish();
    for d in doomed {
        let _ = fs::remove_file(d);
    }
    out.restored = done;
    Ok(out)
}

/// A version already written out in full: its bytes (or link) in a temp file
/// in the folder's temp directory, verified against its hash, with its
/// permissions and mtime, fsynced (a version fetched from a peer).
#[derive(Debug)]
pub struct Fetched {
    /// The temp file ([`temp_path`] in the folder's temp directory); removed
    /// unless it is moved into place.
    pub tmp: PathBuf,
    /// File or symlink.
    pub kind: FileKind,
    /// Whole-file hash (files).
    pub hash: Option<FileHash>,
    /// Link target (symlinks).
    pub symlink_target: Option<String>,
    /// Bytes.
    pub size: u64,
    /// Its history id where it is kept (on the peer).
    pub version: i64,
}

/// Puts a [`Fetched`] version at `path` like [`restore_in_place`]: the version
/// it replaces kept first (`restored-over`), as one transaction; a file
/// changed on disk since the last scan is refused. The caller holds the
/// folder's disk lock and rescans afterwards, so the restore syncs.
pub fn restore_fetched_in_place(
    index: &mut Index,
    folder: &Folder,
    path: &RelPath,
    fetched: Fetched,
) -> Result<Outcome> {
    let staged = Staged { tmp: fetched.tmp };
    check_root(folder)?;
    let root = &folder.path;
    let now = index.local_file(folder.row, path)?;
    let live = now.as_ref().filter(|n| !n.record.deleted);
    let same = live.is_some_and(|n| {
        n.record.kind == fetched.kind
            && match fetched.kind {
                FileKind::File => n.record.hash == fetched.hash,
                FileKind::Symlink => n.record.symlink_target == fetched.symlink_target,
                FileKind::Dir => true,
            }
    });
    if same {
        return Ok(Outcome {
            unchanged: vec![path.to_string()],
            ..Outcome::default()
        });
    }
    if live.is_some_and(|n| n.record.kind == FileKind::Dir) {
        return Err(HistoryError::Refused(format!(
            "{}:{path} is a directory now; move it away first",
            folder.id
        )));
    }
    check_disk(root, path, now.as_ref())?;
    ensure_parents(root, path)?;
    let mut moves = Moves::default();
    let mut doomed = Vec::new();
    let tx = index.history_tx()?;
    let target = path.to_fs(root);
    let result = (|| {
        let kept = set_aside(
            &tx,
            &mut moves,
            &mut doomed,
            folder,
            path,
            HistoryReason::RestoredOver,
        )?;
        moves.rename(&staged.tmp, &target)?;
        Ok(kept)
    })();
    let kept = match result.and_then(|k| Ok(tx.commit().map(|()| k)?)) {
        Ok(k) => k,
        Err(e) => {
            moves.undo();
            return Err(e);
        }
    };
    moves.finish();
    for d in doomed {
        let _ = fs::remove_file(d);
    }
    Ok(Outcome {
        restored: vec![Restored {
            path: path.to_string(),
            version: Some(fetched.version),
            size: fetched.size,
            kept,
            written_to: target,
        }],
        ..Outcome::default()
    })
}

fn left(list: Vec<(RelPath, String)>) -> Vec<LeftAlone> {
    list.into_iter()
        .map(|(p, reason)| LeftAlone {
            path: p.to_string(),
            reason,
        })
        .collect()
}

/// Where [`restore_to`] writes.
#[derive(Debug, Clone, Copy)]
pub struct Dest<'a> {
    /// The file (one path) or directory (a tree) to write.
    pub path: &'a Path,
    /// Whether a tree is restored: `path` then holds the paths below `base`
    /// (the folder root when `None`).
    pub tree: bool,
    /// The path the tree was asked for.
    pub base: Option<&'a RelPath>,
    /// Replace an existing destination (files in it, for a tree).
    pub force: bool,
}

/// Writes what `plan` restores to `dest` instead of its place. An existing
/// destination is refused unless `force`. Nothing is written there unless
/// everything could be read back intact.
pub fn restore_to(
    index: &Index,
    store: &ChunkStore,
    folder: &Folder,
    plan: Plan,
    dest: Dest<'_>,
) -> Result<Outcome> {
    restore_to_with(index, store, folder, plan, dest, &|_| {})
}

/// [`restore_to`], calling `done(bytes)` after each path is read back and
/// staged (for a progress bar).
pub fn restore_to_with(
    index: &Index,
    store: &ChunkStore,
    folder: &Folder,
    plan: Plan,
    dest: Dest<'_>,
    done: &dyn Fn(u64),
) -> Result<Outcome> {
    let Dest {
        path: dest,
        tree,
        base,
        force,
    } = dest;
    let root = &folder.path;
    let exists = fs::symlink_metadata(dest).ok();
    if exists.is_some() && !force {
        return Err(HistoryError::DestExists(dest.to_owned()));
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = dest
        .file_name()
        .ok_or_else(|| HistoryError::Refused(format!("{} is not a file name", dest.display())))?
        .to_string_lossy()
        .into_owned();
    fs::create_dir_all(&parent).map_err(io_at(&parent))?;
    let mut out = Outcome {
        left: left(plan.left),
        ..Outcome::default()
    };
    if !tree {
        let [item] = &plan.items[..] else {
            return Err(HistoryError::Refused("one path to restore expected".into()));
        };
        if exists.as_ref().is_some_and(|m| m.is_dir()) {
            return Err(HistoryError::Refused(format!(
                "{} is a directory; give the file to write",
                dest.display()
            )));
        }
        let staged = stage(index, store, root, &item.source, &parent)?;
        done(item.source.size());
        fs::rename(&staged.tmp, dest).map_err(io_at(dest))?;
        sync_dir(&parent)?;
        out.restored.push(Restored {
            path: item.path.to_string(),
            version: item.source.version_id(),
            size: item.source.size(),
            kept: None,
            written_to: dest.to_owned(),
        });
        return Ok(out);
    }
    if exists.as_ref().is_some_and(|m| !m.is_dir()) {
        return Err(HistoryError::Refused(format!(
            "{} is not a directory",
            dest.display()
        )));
    }
    // Stage the whole tree beside `dest`, then move it in.
    let staging = parent.join(format!("{TEMP_PREFIX}restore-{name}-{}", random_suffix()));
    let cleanup = StagingDir(staging.clone());
    fs::create_dir(&staging).map_err(io_at(&staging))?;
    let mut written = Vec::new();
    for item in &plan.items {
        let rel = match base {
            Some(b) if &item.path == b => RelPath::new(
                item.path
                    .as_str()
                    .rsplit('/')
                    .next()
                    .unwrap_or(item.path.as_str()),
            )
            .map_err(|e| HistoryError::Refused(e.to_string()))?,
            Some(b) => RelPath::new(&item.path.as_str()[b.as_str().len() + 1..])
                .map_err(|e| HistoryError::Refused(e.to_string()))?,
            None => item.path.clone(),
        };
        ensure_parents(&staging, &rel)?;
        let final_path = rel.to_fs(&staging);
        let dir = final_path.parent().unwrap_or(&staging).to_owned();
        let s = stage(index, store, root, &item.source, &dir)?;
        done(item.source.size());
        fs::rename(&s.tmp, &final_path).map_err(io_at(&final_path))?;
        written.push((item, rel));
    }
    if exists.is_none() {
        fs::rename(&staging, dest).map_err(io_at(dest))?;
        std::mem::forget(cleanup);
    } else {
        for (_, rel) in &written {
            ensure_parents(dest, rel)?;
            let to = rel.to_fs(dest);
            if fs::symlink_metadata(&to).is_ok_and(|m| m.is_dir()) {
                return Err(HistoryError::Refused(format!(
                    "{} is a directory; not replacing it",
                    to.display()
                )));
            }
            fs::rename(rel.to_fs(&staging), &to).map_err(io_at(&to))?;
        }
    }
    sync_dir(&parent)?;
    for (item, rel) in written {
        out.restored.push(Restored {
            path: item.path.to_string(),
            version: item.source.version_id(),
            size: item.source.size(),
            kept: None,
            written_to: rel.to_fs(dest),
        });
    }
    Ok(out)
}

/// Removes what an interrupted restore or resolution left in a folder's
/// temp directory. The caller holds the folder's disk lock (under which every
/// restore runs). Returns how many files it removed.
pub fn sweep_temp(root: &Path) -> Result<u64> {
    let dir = temp_dir(root);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_at(&dir)(e)),
    };
    let mut removed = 0;
    for e in entries {
        let e = e.map_err(io_at(&dir))?;
        let name = e.file_name();
        let ours = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .is_some_and(|n| n.starts_with("restore-") || n.starts_with("old-"));
        if ours && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes a staging directory and what is left in it on drop.
struct StagingDir(PathBuf);

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::history::ingest::{ingest_pending, tests::fixture};

    #[test]
    fn a_restore_in_place_keeps_what_it_replaces_and_refuses_an_unscanned_change() {
        let mut f = fixture();
        f.record("a.txt", b"one");
        let v1 = f.replace("a.txt", b"two");
        ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
        let a = RelPath::new("a.txt").unwrap();

        // Changed on disk since the last scan: refused, nothing moves.
        std::fs::write(f.folder.path.join("a.txt"), b"three!").unwrap();
        let p = plan(&f.index, &f.folder, Some(&a), Pick::Version(v1), false).unwrap();
        let err = restore_in_place(&mut f.index, &f.store, &f.folder, p, &|_| {}).unwrap_err();
        assert!(matches!(err, HistoryError::LocalChanged(_)), "{err}");
        assert_eq!(fs::read(f.folder.path.join("a.txt")).unwrap(), b"three!");
        assert_eq!(
            f.index
                .history_of(f.folder.row, Some(&a), false)
                .unwrap()
                .len(),
            1
        );

        f.record("a.txt", b"three");
        let p = plan(&f.index, &f.folder, Some(&a), Pick::Newest, false).unwrap();
        let out = restore_in_place(&mut f.index, &f.store, &f.folder, p, &|_| {}).unwrap();
        assert_eq!(out.restored.len(), 1);
        assert_eq!(fs::read(f.folder.path.join("a.txt")).unwrap(), b"one");
        let kept = out.restored[0].kept.unwrap();
        assert_eq!(f.restore_bytes(kept), b"three");
        let v = f.index.history_version(kept).unwrap().unwrap();
        assert_eq!(v.reason, HistoryReason::RestoredOver);
        assert!(!v.stored);
        assert!(
            fs::read_dir(temp_dir(&f.folder.path))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn a_damaged_chunk_stops_a_restore_before_anything_is_written() {
        let mut f = fixture();
        f.record("a.bin", &[5u8; 300_000]);
        let v1 = f.replace("a.bin", b"x");
        ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
        let pack = &f.index.store_packs().unwrap()[0];
        let path = f
            .store
            .dir()
            .join("packs")
            .join(&pack.name[..2])
            .join(format!("{}.pack", pack.name));
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 1;
        fs::write(&path, bytes).unwrap();
        let a = RelPath::new("a.bin").unwrap();
        let dest = f.folder.path.parent().unwrap().join("out.bin");
        let p = plan(&f.index, &f.folder, Some(&a), Pick::Version(v1), false).unwrap();
        let d = Dest {
            path: &dest,
            tree: false,
            base: None,
            force: false,
        };
        let err = restore_to(&f.index, &f.store, &f.folder, p.clone(), d).unwrap_err();
        assert!(matches!(err, HistoryError::Damaged { .. }), "{err}");
        assert!(!dest.exists());
        let err = restore_in_place(&mut f.index, &f.store, &f.folder, p, &|_| {}).unwrap_err();
        assert!(matches!(err, HistoryError::Damaged { .. }), "{err}");
        assert_eq!(fs::read(f.folder.path.join("a.bin")).unwrap(), b"x");
        let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX))
            .collect();
        assert!(leftovers.is_empty());
    }
}
