//! Index queries for the history of earlier versions: the versions of a path,
//! the state of a folder as of a time, the versions waiting to move into the
//! chunk store, retention, keeping a version before ferry replaces it on this
//! device's own account (restores, conflict resolution, local edits), and the
//! conflicts still open.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use super::{FileKind, Index, IndexError, LocalFile, Result, hash_from, now_secs};
use crate::chunking::{ChunkHash, ChunkInfo, FileHash};
use crate::device::ShortId;
use crate::history::retention::VersionInfo;
use crate::relpath::RelPath;
use crate::version_vector::VersionVector;

/// Why a version left its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HistoryReason {
    /// A remote version replaced it.
    Replaced,
    /// A remote delete removed it.
    Deleted,
    /// It lost a conflict that was resolved.
    Conflict,
    /// A restore (or a conflict resolution) put another version in its place.
    RestoredOver,
    /// A local edit or delete replaced it (folders with `history.local`).
    Local,
}

impl HistoryReason {
    /// The name stored in the index and shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryReason::Replaced => "replaced",
            HistoryReason::Deleted => "deleted",
            HistoryReason::Conflict => "conflict",
            HistoryReason::RestoredOver => "restored-over",
            HistoryReason::Local => "local",
        }
    }

    fn from_sql(s: &str) -> Result<Self> {
        Ok(match s {
            "replaced" => HistoryReason::Replaced,
            "deleted" => HistoryReason::Deleted,
            "conflict" => HistoryReason::Conflict,
            "restored-over" => HistoryReason::RestoredOver,
            "local" => HistoryReason::Local,
            other => return Err(IndexError::Corrupt(format!("history reason {other:?}"))),
        })
    }
}

/// A version kept in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryVersion {
    /// Row id: the version's number in `ferry history`.
    pub id: i64,
    /// Row id of its folder.
    pub folder: i64,
    /// The path it was at.
    pub path: RelPath,
    /// File, directory or symlink.
    pub kind: FileKind,
    /// Bytes.
    pub size: u64,
    /// Modification time, ns.
    pub mtime_ns: i64,
    /// Unix permission bits.
    pub permissions: u32,
    /// Whole-file hash (files).
    pub hash: Option<FileHash>,
    /// Link target (symlinks).
    pub symlink_target: Option<String>,
    /// Its version vector.
    pub version: VersionVector,
    /// The device that made this version.
    pub modified_by: ShortId,
    /// That device's name, if this device knows it.
    pub device: Option<String>,
    /// When it left its path (Unix seconds).
    pub superseded_at: i64,
    /// Why it left.
    pub reason: HistoryReason,
    /// Whether its bytes are in the chunk store (else still the whole file
    /// `<folder>/.ferry/versions/<id>`).
    pub stored: bool,
}

/// What was at a path at a given time, as far as this device kept it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathAt {
    /// The current record: unchanged since then.
    Current(Box<LocalFile>),
    /// A version in the history.
    Version(Box<HistoryVersion>),
    /// Nothing this device kept: the path did not exist then, or the version
    /// it held was not kept.
    Missing,
}

/// One path of a folder as of a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryAt {
    /// The path.
    pub path: RelPath,
    /// What it held.
    pub state: PathAt,
    /// Whether a live record is at the path now.
    pub exists_now: bool,
}

/// A version whose bytes still wait in `<folder>/.ferry/versions/<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingVersion {
    /// Row id.
    pub id: i64,
    /// Row id of the folder.
    pub folder: i64,
    /// The folder root.
    pub root: PathBuf,
    /// The path the version was at.
    pub path: RelPath,
    /// File, directory or symlink.
    pub kind: FileKind,
    /// Bytes.
    pub size: u64,
    /// Whole-file hash (files).
    pub hash: Option<FileHash>,
}

/// A history row a pull reserved for the version it was about to replace,
/// not yet committed as a version (see [`Index::reserve_superseded`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedVersion {
    /// Row id (the pull sets the version's file aside under it).
    pub id: i64,
    /// Row id of the folder.
    pub folder: i64,
    /// The folder root.
    pub root: PathBuf,
    /// The path the version was at.
    pub path: RelPath,
    /// File, directory or symlink.
    pub kind: FileKind,
    /// Link target (symlinks).
    pub symlink_target: Option<String>,
}

/// Totals of the history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HistoryTotals {
    /// Versions kept.
    pub versions: u64,
    /// Their sizes added up (before deduplication).
    pub bytes: u64,
    /// Versions whose bytes still wait to move into the chunk store.
    pub pending: u64,
    /// Their bytes.
    pub pending_bytes: u64,
}

/// An open conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenConflict {
    /// Row id.
    pub id: i64,
    /// The path both versions were at.
    pub path: RelPath,
    /// Where the losing version was kept.
    pub conflict_path: RelPath,
    /// Whether this device's version stayed at `path` (unknown before schema v7).
    pub local_won: Option<bool>,
    /// When it was found (Unix seconds).
    pub detected_at: i64,
}

/// A live file of a folder with local history whose chunks are not all in the
/// store yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureCandidate {
    /// The path.
    pub path: RelPath,
    /// The record's sequence number.
    pub sequence: i64,
    /// Bytes.
    pub size: u64,
    /// Its chunks, in order.
    pub chunks: Vec<ChunkInfo>,
}

/// Where a version of a folder holds a chunk (see [`Index::history_chunk_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionChunk {
    /// The version's history id.
    pub version: i64,
    /// Whether the version's bytes are in the chunk store (else in its
    /// pending file).
    pub stored: bool,
    /// The chunk's offset in the version.
    pub offset: u64,
}

/// Which folders keep the versions local edits replace (`history.local`), by
/// folder id, as the config says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalHistory {
    /// `history.local`.
    pub default: bool,
    /// Per-folder overrides.
    pub folders: HashMap<String, bool>,
}

impl LocalHistory {
    /// Whether folder `id` keeps local versions.
    pub fn keeps(&self, id: &str) -> bool {
        self.folders.get(id).copied().unwrap_or(self.default)
    }

    fn any(&self) -> bool {
        self.default || self.folders.values().any(|v| *v)
    }
}

/// A version kept by [`HistoryTx::supersede`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    /// Its history id.
    pub id: i64,
    /// Whether the caller must move the file to `.ferry/versions/<id>` (a file
    /// with bytes); otherwise the row holds all there is (links, empty files).
    pub move_file: bool,
}

/// A transaction for changes ferry makes on this device's own account: keep
/// the versions about to be replaced, move files, then commit. Dropping it
/// without [`HistoryTx::commit`] rolls back.
pub struct HistoryTx<'a> {
    tx: rusqlite::Transaction<'a>,
}

const COLUMNS: &str = "h.id, h.folder, h.path, h.kind, h.size, h.mtime_ns, h.permissions, h.hash,
    h.symlink_target, h.version, h.modified_by,
    (SELECT name FROM devices d WHERE d.short_id = h.modified_by LIMIT 1),
    h.superseded_at, h.reason, h.stored";

fn version_row(r: &rusqlite::Row<'_>) -> Result<HistoryVersion> {
    let path: String = r.get(2)?;
    let version: Vec<u8> = r.get(9)?;
    let reason: String = r.get(13)?;
    Ok(HistoryVersion {
        id: r.get(0)?,
        folder: r.get(1)?,
        path: RelPath::new(&path).map_err(|e| IndexError::Corrupt(format!("stored path: {e}")))?,
        kind: FileKind::from_sql(r.get(3)?)?,
        size: r.get::<_, i64>(4)? as u64,
        mtime_ns: r.get(5)?,
        permissions: r.get(6)?,
        hash: hash_from(r.get::<_, Option<Vec<u8>>>(7)?.as_deref())?,
        symlink_target: r.get(8)?,
        version: VersionVector::decode(&version)
            .map_err(|e| IndexError::Corrupt(format!("{path}: {e}")))?,
        modified_by: ShortId(r.get::<_, i64>(10)? as u64),
        device: r.get(11)?,
        superseded_at: r.get(12)?,
        reason: HistoryReason::from_sql(&reason)?,
        stored: r.get(14)?,
    })
}

/// A reserved row: `id, folder, root, path, kind, symlink_target`.
fn reserved_row(r: &rusqlite::Row<'_>) -> Result<ReservedVersion> {
    let root: String = r.get(2)?;
    let path: String = r.get(3)?;
    Ok(ReservedVersion {
        id: r.get(0)?,
        folder: r.get(1)?,
        root: PathBuf::from(root),
        path: RelPath::new(&path).map_err(|e| IndexError::Corrupt(format!("stored path: {e}")))?,
        kind: FileKind::from_sql(r.get(4)?)?,
        symlink_target: r.get(5)?,
    })
}

/// `(exact, lo, hi)` bounds selecting `under` and the paths below it (all
/// paths when `None`): paths below `p` sort between "p/" and "p0".
fn bounds(under: Option<&RelPath>) -> (String, String, String) {
    match under {
        Some(p) => (p.as_str().to_owned(), format!("{p}/"), format!("{p}0")),
        None => (String::new(), String::new(), "\u{10FFFF}".to_owned()),
    }
}

fn chunk_list(rows: Vec<(i64, u32, Vec<u8>)>) -> Result<Vec<ChunkInfo>> {
    rows.into_iter()
        .map(|(offset, len, hash)| {
            Ok(ChunkInfo {
                offset: offset as u64,
                len,
                hash: ChunkHash::from_slice(&hash)
                    .ok_or_else(|| IndexError::Corrupt("chunk hash length".into()))?,
            })
        })
        .collect()
}

/// Whether a record last modified at `mtime_ns` already had that content at
/// `at` (Unix seconds).
fn modified_by_then(mtime_ns: i64, at: i64) -> bool {
    mtime_ns.div_euclid(1_000_000_000) <= at
}

/// Keeps the live record `file` in the history as a version a local change
/// replaced, inside the scanner's transaction, if all its bytes are in the
/// chunk store (captured when it was seen) and it is not kept already.
pub(super) fn keep_local_version(tx: &rusqlite::Transaction<'_>, file: i64) -> Result<()> {
    let n = tx
        .prepare_cached(
            "INSERT INTO history (folder, path, kind, size, mtime_ns, permissions, hash,
                 symlink_target, version, modified_by, superseded_at, reason, stored)
             SELECT folder, path, kind, size, mtime_ns, permissions, hash, symlink_target,
                 version, modified_by, ?2, 'local', 1
             FROM files f WHERE f.id = ?1 AND f.deleted = 0 AND f.kind IN (0, 2)
               AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.file = f.id AND NOT EXISTS
                   (SELECT 1 FROM store_chunks s WHERE s.hash = c.hash))
               AND NOT EXISTS (SELECT 1 FROM history h WHERE h.folder = f.folder
                   AND h.path = f.path AND h.version = f.version AND h.reserved = 0)",
        )?
        .execute(params![file, now_secs()])?;
    if n == 1 {
        let hid = tx.last_insert_rowid();
        tx.prepare_cached(
            "INSERT INTO history_chunks (version, idx, offset, size, hash)
             SELECT ?2, idx, offset, size, hash FROM chunks WHERE file = ?1",
        )?
        .execute([file, hid])?;
    }
    Ok(())
}

impl Index {
    /// Sets which folders keep the versions local edits replace.
    pub fn set_local_history(&mut self, local: LocalHistory) {
        self.local_history = local;
    }

    /// Whether the folder with row id `folder` keeps local versions.
    pub fn keeps_local_history(&self, folder: i64) -> Result<bool> {
        if !self.local_history.any() {
            return Ok(false);
        }
        let id: Option<String> = self
            .conn
            .prepare_cached("SELECT folder_id FROM folders WHERE id = ?1")?
            .query_row([folder], |r| r.get(0))
            .optional()?;
        Ok(id.is_some_and(|id| self.local_history.keeps(&id)))
    }

    /// Row ids of the folders that keep local versions.
    pub fn local_history_folders(&self) -> Result<Vec<i64>> {
        if !self.local_history.any() {
            return Ok(Vec::new());
        }
        Ok(self
            .folders()?
            .into_iter()
            .filter(|f| self.local_history.keeps(f.id.as_str()))
            .map(|f| f.row)
            .collect())
    }

    /// The name of the device with this short id, if known.
    pub fn device_name(&self, short: ShortId) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT name FROM devices WHERE short_id = ?1 LIMIT 1")?
            .query_row([short.0 as i64], |r| r.get(0))
            .optional()?)
    }

    /// The versions kept of `path` (and, with `below`, of the paths below it;
    /// the whole folder when `path` is `None`), newest first.
    pub fn history_of(
        &self,
        folder: i64,
        path: Option<&RelPath>,
        below: bool,
    ) -> Result<Vec<HistoryVersion>> {
        let below = below || path.is_none();
        let (exact, lo, hi) = bounds(path);
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM history h
             WHERE h.folder = ?1 AND (h.path = ?2 OR (?5 AND h.path >= ?3 AND h.path < ?4))
               AND h.reserved = 0
             ORDER BY h.superseded_at DESC, h.id DESC"
        ))?;
        let mut rows = stmt.query(params![folder, exact, lo, hi, below])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(version_row(r)?);
        }
        Ok(out)
    }

    /// One version by id.
    pub fn history_version(&self, id: i64) -> Result<Option<HistoryVersion>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM history h WHERE h.id = ?1 AND h.reserved = 0"
        ))?;
        let mut rows = stmt.query([id])?;
        match rows.next()? {
            Some(r) => Ok(Some(version_row(r)?)),
            None => Ok(None),
        }
    }

    /// The versions of a folder kept after history row `after`, in row order,
    /// at most `limit`.
    pub fn history_after(
        &self,
        folder: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<HistoryVersion>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM history h
             WHERE h.folder = ?1 AND h.id > ?2 AND h.reserved = 0 ORDER BY h.id LIMIT ?3"
        ))?;
        let mut rows = stmt.query(params![folder, after, limit as i64])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(version_row(r)?);
        }
        Ok(out)
    }

    /// A version's chunks, in order.
    pub fn history_chunks(&self, id: i64) -> Result<Vec<ChunkInfo>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT offset, size, hash FROM history_chunks WHERE version = ?1 ORDER BY idx",
        )?;
        let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        chunk_list(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Versions of folder `folder` (only that folder's: what a peer sharing it
    /// may read) that hold a chunk of this hash and size, at most `limit`.
    pub fn history_chunk_in(
        &self,
        folder: i64,
        hash: &ChunkHash,
        size: u32,
        limit: usize,
    ) -> Result<Vec<VersionChunk>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT h.id, h.stored, c.offset
             FROM history_chunks c JOIN history h ON h.id = c.version
             WHERE c.hash = ?1 AND c.size = ?2 AND h.folder = ?3 AND h.reserved = 0
             ORDER BY h.stored DESC LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![&hash.0[..], size, folder, limit as i64], |r| {
            Ok(VersionChunk {
                version: r.get(0)?,
                stored: r.get(1)?,
                offset: r.get::<_, i64>(2)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every file and symlink path of a folder at or below `under` (the whole
    /// folder if `None`) as it was at `at` (Unix seconds), by path: the version
    /// current then, deleted files included.
    ///
    /// A path's state at `at` is the first version kept that left it after
    /// `at`, if that version's content was written by then (its mtime); with
    /// none, the current record if it was modified by then; else nothing kept.
    pub fn tree_at(&self, folder: i64, under: Option<&RelPath>, at: i64) -> Result<Vec<EntryAt>> {
        let (exact, lo, hi) = bounds(under);
        let mut first_after: HashMap<String, HistoryVersion> = HashMap::new();
        {
            let mut stmt = self.conn.prepare(&format!(
                "SELECT {COLUMNS} FROM history h
                 WHERE h.folder = ?1 AND (h.path = ?2 OR (h.path >= ?3 AND h.path < ?4))
                   AND h.superseded_at > ?5 AND h.kind != 1 AND h.reserved = 0
                 ORDER BY h.path, h.superseded_at, h.id"
            ))?;
            let mut rows = stmt.query(params![folder, exact, lo, hi, at])?;
            while let Some(r) = rows.next()? {
                let v = version_row(r)?;
                first_after.entry(v.path.as_str().to_owned()).or_insert(v);
            }
        }
        let mut seen_paths: HashSet<String> = HashSet::new();
        {
            let mut stmt = self.conn.prepare(
                "SELECT DISTINCT path FROM history
                 WHERE folder = ?1 AND (path = ?2 OR (path >= ?3 AND path < ?4)) AND kind != 1
                   AND reserved = 0",
            )?;
            let rows = stmt.query_map(params![folder, exact, lo, hi], |r| r.get::<_, String>(0))?;
            for p in rows {
                seen_paths.insert(p?);
            }
        }
        let current: HashMap<String, LocalFile> = self
            .local_files(folder)?
            .into_iter()
            .filter(|(p, f)| {
                f.record.kind != FileKind::Dir
                    && under.is_none_or(|u| f.record.path.starts_with(u))
                    && (!f.record.deleted || seen_paths.contains(p))
            })
            .collect();
        seen_paths.extend(current.keys().cloned());
        let mut out = Vec::with_capacity(seen_paths.len());
        for p in seen_paths {
            let now = current.get(&p).filter(|f| !f.record.deleted);
            let state = match first_after.remove(&p) {
                Some(v) if modified_by_then(v.mtime_ns, at) => PathAt::Version(Box::new(v)),
                Some(_) => PathAt::Missing,
                None => match now {
                    Some(f) if modified_by_then(f.record.mtime_ns, at) => {
                        PathAt::Current(Box::new(f.clone()))
                    }
                    _ => PathAt::Missing,
                },
            };
            out.push(EntryAt {
                path: RelPath::new(&p)
                    .map_err(|e| IndexError::Corrupt(format!("stored path: {e}")))?,
                state,
                exists_now: now.is_some(),
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Versions whose bytes still wait in the folder's `.ferry/versions`, oldest
    /// first, at most `limit`.
    pub fn history_pending(&self, limit: usize) -> Result<Vec<PendingVersion>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT h.id, h.folder, f.path, h.path, h.kind, h.size, h.hash
             FROM history h JOIN folders f ON f.id = h.folder
             WHERE h.stored = 0 AND h.reserved = 0 ORDER BY h.id LIMIT ?1",
        )?;
        let mut rows = stmt.query([limit as i64])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let root: String = r.get(2)?;
            let path: String = r.get(3)?;
            out.push(PendingVersion {
                id: r.get(0)?,
                folder: r.get(1)?,
                root: PathBuf::from(root),
                path: RelPath::new(&path)
                    .map_err(|e| IndexError::Corrupt(format!("stored path: {e}")))?,
                kind: FileKind::from_sql(r.get(4)?)?,
                size: r.get::<_, i64>(5)? as u64,
                hash: hash_from(r.get::<_, Option<Vec<u8>>>(6)?.as_deref())?,
            });
        }
        Ok(out)
    }

    /// Rows pulls reserved before `before` (Unix seconds) and did not commit:
    /// left by a pull killed between its two transactions (or one in progress
    /// in another connection, for rows reserved just now).
    pub fn history_reserved(&self, before: i64) -> Result<Vec<ReservedVersion>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT h.id, h.folder, f.path, h.path, h.kind, h.symlink_target
             FROM history h JOIN folders f ON f.id = h.folder
             WHERE h.reserved = 1 AND h.superseded_at < ?1 ORDER BY h.id",
        )?;
        let mut rows = stmt.query([before])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(reserved_row(r)?);
        }
        Ok(out)
    }

    /// Settles a reserved row under the write lock: `left` says whether the
    /// version left its path (the pull moved it before it was killed), in
    /// which case the row becomes a version; otherwise the version never left
    /// and the row (with its chunk list) is dropped. Returns `Some(kept)`, or
    /// `None` if the row is no longer reserved (its pull committed, or it was
    /// settled already) or `left` cannot tell. Inside a transaction it joins
    /// it.
    pub fn history_settle_reserved(
        &mut self,
        id: i64,
        left: impl FnOnce(&ReservedVersion) -> Option<bool>,
    ) -> Result<Option<bool>> {
        if self.conn.is_autocommit() {
            return self.batch(|i| i.history_settle_reserved(id, left));
        }
        let row = self
            .conn
            .prepare_cached(
                "SELECT h.id, h.folder, f.path, h.path, h.kind, h.symlink_target
                 FROM history h JOIN folders f ON f.id = h.folder
                 WHERE h.id = ?1 AND h.reserved = 1",
            )?
            .query_row([id], |r| Ok(reserved_row(r)))
            .optional()?
            .transpose()?;
        let Some(row) = row else { return Ok(None) };
        let Some(kept) = left(&row) else {
            return Ok(None);
        };
        if kept {
            self.conn
                .prepare_cached("UPDATE history SET reserved = 0 WHERE id = ?1")?
                .execute([id])?;
        } else {
            self.conn
                .prepare_cached("DELETE FROM history WHERE id = ?1")?
                .execute([id])?;
        }
        Ok(Some(kept))
    }

    /// Marks versions as stored (their bytes are in the chunk store, or they
    /// have none), in one transaction.
    pub fn history_mark_stored(&mut self, ids: &[i64]) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut mark = tx.prepare_cached("UPDATE history SET stored = 1 WHERE id = ?1")?;
            for id in ids {
                mark.execute([id])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Of `ids`, those whose row says their bytes are in the chunk store.
    pub fn history_stored_among(&self, ids: &[i64]) -> Result<HashSet<i64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT stored FROM history WHERE id = ?1")?;
        let mut out = HashSet::new();
        for id in ids {
            let stored: Option<bool> = stmt.query_row([id], |r| r.get(0)).optional()?;
            if stored == Some(true) {
                out.insert(*id);
            }
        }
        Ok(out)
    }

    /// What retention needs of every version of a folder.
    pub fn history_for_retention(&self, folder: i64) -> Result<Vec<VersionInfo>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, path, superseded_at, size FROM history
             WHERE folder = ?1 AND reserved = 0 ORDER BY id",
        )?;
        let rows = stmt.query_map([folder], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        rows.map(|row| {
            let (id, path, superseded_at, size) = row?;
            Ok(VersionInfo {
                id,
                path: RelPath::new(&path)
                    .map_err(|e| IndexError::Corrupt(format!("stored path: {e}")))?,
                superseded_at,
                size: size as u64,
            })
        })
        .collect()
    }

    /// Deletes versions (and their chunk lists) in one transaction that is
    /// durable before it returns (the caller deletes their pending files next).
    /// Returns the ids deleted whose bytes were still pending.
    pub fn history_delete(&mut self, ids: &[i64]) -> Result<Vec<i64>> {
        self.durably(|tx| {
            let mut pending = Vec::new();
            let mut del = tx.prepare_cached(
                "DELETE FROM history WHERE id = ?1 AND reserved = 0 RETURNING stored",
            )?;
            for id in ids {
                let stored: Option<bool> = del.query_row([id], |r| r.get(0)).optional()?;
                if stored == Some(false) {
                    pending.push(*id);
                }
            }
            Ok(pending)
        })
    }

    /// Totals of the history (one folder, or all with `None`).
    pub fn history_totals(&self, folder: Option<i64>) -> Result<HistoryTotals> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0),
                    COALESCE(SUM(stored = 0), 0), COALESCE(SUM(CASE WHEN stored = 0 THEN size END), 0)
             FROM history WHERE (?1 IS NULL OR folder = ?1) AND reserved = 0",
            [folder],
            |r| {
                Ok(HistoryTotals {
                    versions: r.get::<_, i64>(0)? as u64,
                    bytes: r.get::<_, i64>(1)? as u64,
                    pending: r.get::<_, i64>(2)? as u64,
                    pending_bytes: r.get::<_, i64>(3)? as u64,
                })
            },
        )?)
    }

    /// Distinct chunks of versions marked stored that the store lacks, and how
    /// many versions need each.
    pub fn history_missing_chunks(&self) -> Result<Vec<(ChunkHash, u64)>> {
        let mut stmt = self.conn.prepare(
            "SELECT c.hash, COUNT(DISTINCT c.version) FROM history_chunks c
             JOIN history h ON h.id = c.version
             WHERE h.stored = 1 AND NOT EXISTS (SELECT 1 FROM store_chunks s WHERE s.hash = c.hash)
             GROUP BY c.hash ORDER BY c.hash",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
        rows.map(|row| {
            let (h, n) = row?;
            Ok((
                ChunkHash::from_slice(&h)
                    .ok_or_else(|| IndexError::Corrupt("chunk hash length".into()))?,
                n as u64,
            ))
        })
        .collect()
    }

    /// How many versions marked stored need any of `hashes`.
    pub fn history_versions_using(&self, hashes: &[ChunkHash]) -> Result<u64> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT c.version FROM history_chunks c JOIN history h ON h.id = c.version
             WHERE c.hash = ?1 AND h.stored = 1",
        )?;
        let mut versions = HashSet::new();
        for h in hashes {
            let rows = stmt.query_map([&h.0[..]], |r| r.get::<_, i64>(0))?;
            for v in rows {
                versions.insert(v?);
            }
        }
        Ok(versions.len() as u64)
    }

    /// Live files of a folder changed since sequence `after` whose chunks are
    /// not all in the store, for local history to capture.
    pub fn capture_candidates(&self, folder: i64, after: i64) -> Result<Vec<CaptureCandidate>> {
        let found: Vec<(String, i64, i64)> = {
            let mut stmt = self.conn.prepare(
                "SELECT f.path, f.sequence, f.size FROM files f
                 WHERE f.folder = ?1 AND f.sequence > ?2 AND f.deleted = 0 AND f.kind = 0
                   AND EXISTS (SELECT 1 FROM chunks c WHERE c.file = f.id AND NOT EXISTS
                       (SELECT 1 FROM store_chunks s WHERE s.hash = c.hash))
                 ORDER BY f.sequence",
            )?;
            let rows = stmt.query_map(params![folder, after], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut out = Vec::with_capacity(found.len());
        for (path, sequence, size) in found {
            let path = RelPath::new(&path)
                .map_err(|e| IndexError::Corrupt(format!("stored path: {e}")))?;
            let chunks = self.file_chunks(folder, &path)?;
            out.push(CaptureCandidate {
                path,
                sequence,
                size: size as u64,
                chunks,
            });
        }
        Ok(out)
    }

    /// The live files of a folder (those at or below `under`; all when `None`)
    /// whose bytes are all in the history store: with local history, a local
    /// edit or delete of one keeps its version; one not listed would be lost.
    pub fn stored_files(&self, folder: i64, under: Option<&RelPath>) -> Result<HashSet<RelPath>> {
        let (exact, lo, hi) = bounds(under);
        let mut stmt = self.conn.prepare(
            "SELECT f.path FROM files f
             WHERE f.folder = ?1 AND (f.path = ?2 OR (f.path >= ?3 AND f.path < ?4))
               AND f.deleted = 0 AND f.kind = 0
               AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.file = f.id AND NOT EXISTS
                   (SELECT 1 FROM store_chunks s WHERE s.hash = c.hash))",
        )?;
        let rows = stmt.query_map(params![folder, exact, lo, hi], |r| r.get::<_, String>(0))?;
        rows.map(|p| {
            RelPath::new(&p?).map_err(|e| IndexError::Corrupt(format!("stored path: {e}")))
        })
        .collect()
    }

    /// The open conflicts whose path or conflict copy is `path`, newest first.
    pub fn open_conflicts(&self, folder: i64, path: &RelPath) -> Result<Vec<OpenConflict>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, path, conflict_path, local_won, detected_at FROM conflicts
             WHERE folder = ?1 AND resolved_at IS NULL AND (path = ?2 OR conflict_path = ?2)
             ORDER BY detected_at DESC, id DESC",
        )?;
        let rows = stmt.query_map(params![folder, path.as_str()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<bool>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        rows.map(|row| {
            let (id, p, c, local_won, detected_at) = row?;
            let rel = |s: &str| {
                RelPath::new(s).map_err(|e| IndexError::Corrupt(format!("stored path: {e}")))
            };
            Ok(OpenConflict {
                id,
                path: rel(&p)?,
                conflict_path: rel(&c)?,
                local_won,
                detected_at,
            })
        })
        .collect()
    }

    /// Starts a [`HistoryTx`].
    pub fn history_tx(&mut self) -> Result<HistoryTx<'_>> {
        Ok(HistoryTx {
            tx: self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?,
        })
    }
}

impl HistoryTx<'_> {
    /// Keeps the live file or symlink record at `path` as a version that left
    /// for `reason`. `None` if there is no such record.
    pub fn supersede(
        &self,
        folder: i64,
        path: &RelPath,
        reason: HistoryReason,
    ) -> Result<Option<Kept>> {
        let old: Option<(i64, i64, i64)> = self
            .tx
            .prepare_cached(
                "SELECT id, kind, size FROM files
                 WHERE folder = ?1 AND path = ?2 AND deleted = 0 AND kind IN (0, 2)",
            )?
            .query_row(params![folder, path.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let Some((file, kind, size)) = old else {
            return Ok(None);
        };
        let move_file = kind == 0 && size > 0;
        self.tx
            .prepare_cached(
                "INSERT INTO history (folder, path, kind, size, mtime_ns, permissions, hash,
                     symlink_target, version, modified_by, superseded_at, reason, stored)
                 SELECT folder, path, kind, size, mtime_ns, permissions, hash, symlink_target,
                     version, modified_by, ?2, ?3, ?4
                 FROM files WHERE id = ?1",
            )?
            .execute(params![file, now_secs(), reason.as_str(), !move_file])?;
        let id = self.tx.last_insert_rowid();
        self.tx
            .prepare_cached(
                "INSERT INTO history_chunks (version, idx, offset, size, hash)
                 SELECT ?2, idx, offset, size, hash FROM chunks WHERE file = ?1",
            )?
            .execute([file, id])?;
        Ok(Some(Kept { id, move_file }))
    }

    /// Marks a conflict resolved now, with how.
    pub fn resolve_conflict(&self, id: i64, resolution: &str) -> Result<()> {
        self.tx.execute(
            "UPDATE conflicts SET resolved_at = ?2, resolution = ?3 WHERE id = ?1",
            params![id, now_secs(), resolution],
        )?;
        Ok(())
    }

    /// Commits.
    pub fn commit(self) -> Result<()> {
        self.tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::ShortId;
    use crate::folder::{FolderId, FolderType};
    use crate::index::{Change, FileMeta, LocalChange};
    use std::path::Path;
    use std::time::Duration;

    const S: i64 = 1_000_000_000;

    fn index() -> (tempfile::TempDir, Index, i64) {
        let dir = tempfile::tempdir().unwrap();
        let mut idx = Index::open(&dir.path().join("index.db"), Duration::from_secs(5)).unwrap();
        let f = idx
            .add_folder(
                &FolderId::new("docs").unwrap(),
                "docs",
                Path::new("/srv/docs"),
                FolderType::SendReceive,
                || Ok(()),
            )
            .unwrap();
        (dir, idx, f.row)
    }

    fn write(idx: &mut Index, folder: i64, path: &str, content: u8, mtime: i64) {
        let chunk = ChunkInfo {
            offset: 0,
            len: 1,
            hash: ChunkHash([content; 32]),
        };
        let change = LocalChange {
            path: RelPath::new(path).unwrap(),
            meta: FileMeta {
                kind: FileKind::File,
                size: 1,
                mtime_ns: mtime * S,
                permissions: 0o644,
                inode: content as u64,
                dev: 1,
            },
            change: Change::Content {
                hash: FileHash([content; 32]),
                chunks: vec![chunk],
            },
        };
        idx.apply_local_changes(folder, ShortId(1), &[change])
            .unwrap();
    }

    fn delete(idx: &mut Index, folder: i64, path: &str) {
        let change = LocalChange {
            path: RelPath::new(path).unwrap(),
            meta: FileMeta {
                kind: FileKind::File,
                size: 0,
                mtime_ns: 0,
                permissions: 0,
                inode: 0,
                dev: 0,
            },
            change: Change::Deleted,
        };
        idx.apply_local_changes(folder, ShortId(1), &[change])
            .unwrap();
    }

    #[test]
    fn chunk_sources_in_bulk_match_one_at_a_time() {
        let (_d, mut idx, f) = index();
        // 300 files (more than one batch), some sharing content; one deleted.
        for n in 0..300u32 {
            write(&mut idx, f, &format!("f{n}"), (n % 200) as u8, 1);
        }
        delete(&mut idx, f, "f7");
        let mut hashes: Vec<ChunkHash> = (0..=255u8).map(|c| ChunkHash([c; 32])).collect();
        hashes.push(ChunkHash([9; 32])); // asked twice, listed once
        let bulk = idx.chunk_sources_of(&hashes, 4).unwrap();
        for h in &hashes {
            let one = idx.chunk_sources(h, 4).unwrap();
            let mut got = bulk.get(h).cloned().unwrap_or_default();
            let mut want = one.clone();
            got.sort_by(|a, b| a.path.cmp(&b.path));
            want.sort_by(|a, b| a.path.cmp(&b.path));
            assert_eq!(got, want, "{h:?}");
        }
        // Content 7 lives in f7 (deleted) and f207; 250 in no file.
        assert_eq!(bulk[&ChunkHash([7; 32])].len(), 1);
        assert!(!bulk.contains_key(&ChunkHash([250; 32])));
    }

    /// Keeps the live record of `path` as if replaced at `at`.
    fn keep(idx: &mut Index, folder: i64, path: &str, at: i64) -> i64 {
        let tx = idx.history_tx().unwrap();
        let kept = tx
            .supersede(
                folder,
                &RelPath::new(path).unwrap(),
                HistoryReason::Replaced,
            )
            .unwrap()
            .unwrap();
        tx.commit().unwrap();
        idx.conn
            .execute(
                "UPDATE history SET superseded_at = ?2 WHERE id = ?1",
                [kept.id, at],
            )
            .unwrap();
        kept.id
    }

    fn state(entries: &[EntryAt], path: &str) -> String {
        match &entries
            .iter()
            .find(|e| e.path.as_str() == path)
            .unwrap()
            .state
        {
            PathAt::Current(_) => "current".into(),
            PathAt::Version(v) => format!("v{}", v.hash.unwrap().0[0]),
            PathAt::Missing => "missing".into(),
        }
    }

    #[test]
    fn the_tree_at_a_time_takes_the_version_current_then_deleted_files_included() {
        let (_d, mut idx, f) = index();
        // a: v1 at 100, replaced by v2 at 200 (made at 150), then v3 at 300.
        write(&mut idx, f, "a", 1, 100);
        keep(&mut idx, f, "a", 200);
        write(&mut idx, f, "a", 2, 150);
        keep(&mut idx, f, "a", 300);
        write(&mut idx, f, "a", 3, 300);
        // d/b: made at 100, deleted at 250.
        write(&mut idx, f, "d/b", 4, 100);
        keep(&mut idx, f, "d/b", 250);
        delete(&mut idx, f, "d/b");
        // c: made at 400.
        write(&mut idx, f, "c", 5, 400);

        let t = idx.tree_at(f, None, 50).unwrap();
        assert_eq!(state(&t, "a"), "missing");
        assert_eq!(state(&t, "d/b"), "missing");
        let t = idx.tree_at(f, None, 120).unwrap();
        assert_eq!(state(&t, "a"), "v1");
        assert_eq!(state(&t, "d/b"), "v4");
        assert_eq!(state(&t, "c"), "missing");
        let t = idx.tree_at(f, None, 260).unwrap();
        assert_eq!(state(&t, "a"), "v2");
        assert_eq!(state(&t, "d/b"), "missing");
        let t = idx.tree_at(f, None, 500).unwrap();
        assert_eq!(state(&t, "a"), "current");
        assert_eq!(state(&t, "c"), "current");
        assert!(
            t.iter()
                .find(|e| e.path.as_str() == "c")
                .unwrap()
                .exists_now
        );
        assert!(
            !t.iter()
                .find(|e| e.path.as_str() == "d/b")
                .unwrap()
                .exists_now
        );

        let d = RelPath::new("d").unwrap();
        let t = idx.tree_at(f, Some(&d), 120).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].path.as_str(), "d/b");
    }

    #[test]
    fn versions_are_listed_newest_first_with_their_chunks_and_pending_until_stored() {
        let (_d, mut idx, f) = index();
        write(&mut idx, f, "a", 1, 100);
        let v1 = keep(&mut idx, f, "a", 200);
        write(&mut idx, f, "a", 2, 150);
        let v2 = keep(&mut idx, f, "a", 300);
        let a = RelPath::new("a").unwrap();
        let list = idx.history_of(f, Some(&a), false).unwrap();
        assert_eq!(list.iter().map(|v| v.id).collect::<Vec<_>>(), [v2, v1]);
        assert_eq!(list[0].reason, HistoryReason::Replaced);
        assert!(!list[0].stored);
        assert_eq!(idx.history_chunks(v1).unwrap()[0].hash, ChunkHash([1; 32]));
        let pending: Vec<i64> = idx
            .history_pending(10)
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(pending, [v1, v2]);
        idx.history_mark_stored(&[v1]).unwrap();
        assert_eq!(idx.history_pending(10).unwrap().len(), 1);
        assert_eq!(
            idx.history_stored_among(&[v1, v2, 999]).unwrap(),
            HashSet::from([v1])
        );
        let totals = idx.history_totals(None).unwrap();
        assert_eq!((totals.versions, totals.pending), (2, 1));
        assert_eq!(idx.history_delete(&[v1, v2]).unwrap(), vec![v2]);
        assert!(idx.history_of(f, Some(&a), false).unwrap().is_empty());
    }

    #[test]
    fn a_history_chunk_is_found_only_in_its_own_folder() {
        let (_d, mut idx, f) = index();
        let other = idx
            .add_folder(
                &FolderId::new("private").unwrap(),
                "private",
                Path::new("/srv/private"),
                FolderType::SendReceive,
                || Ok(()),
            )
            .unwrap()
            .row;
        write(&mut idx, other, "secret", 9, 100);
        let v = keep(&mut idx, other, "secret", 200);
        let hash = ChunkHash([9; 32]);
        let found = idx.history_chunk_in(other, &hash, 1, 8).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].version, found[0].offset), (v, 0));
        assert!(idx.history_chunk_in(f, &hash, 1, 8).unwrap().is_empty());
        assert!(idx.history_chunk_in(other, &hash, 2, 8).unwrap().is_empty());
    }

    #[test]
    fn local_edits_keep_the_replaced_version_only_when_asked_and_its_bytes_are_stored() {
        let (_d, mut idx, f) = index();
        write(&mut idx, f, "a", 1, 100);
        write(&mut idx, f, "a", 2, 200);
        let a = RelPath::new("a").unwrap();
        assert!(idx.history_of(f, Some(&a), false).unwrap().is_empty());

        idx.set_local_history(LocalHistory {
            default: false,
            folders: HashMap::from([("docs".into(), true)]),
        });
        assert!(idx.keeps_local_history(f).unwrap());
        // Not captured: nothing to keep.
        write(&mut idx, f, "a", 3, 300);
        assert!(idx.history_of(f, Some(&a), false).unwrap().is_empty());
        assert_eq!(idx.capture_candidates(f, 0).unwrap().len(), 1);
        // Captured: the next edit keeps it.
        idx.store_add_pack(
            "0123456789abcdef0123456789abcdef",
            100,
            &[crate::index::StoredChunk {
                hash: ChunkHash([3; 32]),
                offset: 9,
                length: 1,
            }],
        )
        .unwrap();
        assert!(idx.capture_candidates(f, 0).unwrap().is_empty());
        assert!(idx.stored_files(f, None).unwrap().contains(&a));
        write(&mut idx, f, "a", 4, 400);
        assert!(idx.stored_files(f, Some(&a)).unwrap().is_empty());
        let list = idx.history_of(f, Some(&a), false).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].reason, HistoryReason::Local);
        assert!(list[0].stored);
        assert_eq!(list[0].hash, Some(FileHash([3; 32])));
    }
}
