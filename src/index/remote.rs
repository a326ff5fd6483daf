//! Index queries for the sync engine: the records peers announced, how far each
//! peer's index has been received, local records to announce, where a chunk can
//! be read locally, and recording a pulled file (with the version it replaced
//! kept in the history) in one transaction.

use std::collections::HashMap;
use std::path::PathBuf;

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{
    FileKind, FileMeta, Index, IndexError, Result, UPSERT_FILE, hash_from, next_sequence, now_secs,
};
use crate::chunking::{ChunkGroup, ChunkHash, ChunkInfo, FileHash};
use crate::device::{DeviceId, ShortId};
use crate::relpath::RelPath;
use crate::version_vector::VersionVector;

/// A file record as a peer announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path in the folder.
    pub path: RelPath,
    /// File, directory or symlink.
    pub kind: FileKind,
    /// Size (files).
    pub size: u64,
    /// Modification time, ns.
    pub mtime_ns: i64,
    /// Unix permission bits.
    pub permissions: u32,
    /// Whole-file hash (files).
    pub hash: Option<FileHash>,
    /// Link target (symlinks).
    pub symlink_target: Option<String>,
    /// A tombstone.
    pub deleted: bool,
    /// Version vector.
    pub version: VersionVector,
    /// Who made this version.
    pub modified_by: ShortId,
    /// The peer's sequence number of the record.
    pub sequence: u64,
    /// The chunk list in groups (files).
    pub groups: Vec<ChunkGroup>,
}

impl RemoteFile {
    /// Whether `other` has the same content and metadata a peer would see
    /// (versions aside).
    pub fn same_content(&self, other: &RemoteFile) -> bool {
        self.deleted == other.deleted
            && (self.deleted
                || (self.kind == other.kind
                    && self.hash == other.hash
                    && self.symlink_target == other.symlink_target))
    }
}

/// A local record with what the sync engine needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    /// The record in the same shape as a remote one (`sequence` is local;
    /// `groups` is empty: read chunks with [`Index::file_chunks`]).
    pub record: RemoteFile,
    /// The stat fields last seen on disk.
    pub meta: FileMeta,
}

/// Where a chunk can be read on this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSource {
    /// The file.
    pub path: PathBuf,
    /// Offset in it.
    pub offset: u64,
    /// Length.
    pub size: u32,
}

/// What a pull replaced, to keep in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Superseded {
    /// The local file was replaced by a remote version.
    Replaced,
    /// The local file was deleted by a remote delete.
    Deleted,
}

impl Superseded {
    fn as_sql(self) -> &'static str {
        match self {
            Superseded::Replaced => "replaced",
            Superseded::Deleted => "deleted",
        }
    }
}

/// A new record for a path, after a pull put it on disk.
#[derive(Debug, Clone)]
pub struct Pulled<'a> {
    /// The record as the peer announced it.
    pub remote: &'a RemoteFile,
    /// The version to record (the remote one, or merged with ours).
    pub version: VersionVector,
    /// Stat fields of what is now on disk (for deletes, the last ones known).
    pub meta: FileMeta,
    /// Its chunks (files).
    pub chunks: &'a [ChunkInfo],
}

/// Encodes groups for the `remote_files.groups` column.
pub fn encode_groups(groups: &[ChunkGroup]) -> Vec<u8> {
    let mut out = Vec::with_capacity(groups.len() * 44);
    for g in groups {
        out.extend_from_slice(&g.hash);
        out.extend_from_slice(&g.chunks.to_be_bytes());
        out.extend_from_slice(&g.size.to_be_bytes());
    }
    out
}

/// Decodes the `remote_files.groups` column.
pub fn decode_groups(b: &[u8]) -> Result<Vec<ChunkGroup>> {
    if !b.len().is_multiple_of(44) {
        return Err(IndexError::Corrupt("chunk groups length".into()));
    }
    Ok(b.chunks_exact(44)
        .map(|e| ChunkGroup {
            hash: e[..32].try_into().expect("32 bytes"),
            chunks: u32::from_be_bytes(e[32..36].try_into().expect("4 bytes")),
            size: u64::from_be_bytes(e[36..44].try_into().expect("8 bytes")),
        })
        .collect())
}

/// The columns both record queries start with, in this order.
const RECORD_COLUMNS: &str = "path, kind, size, mtime_ns, permissions, hash, symlink_target, \
                              deleted, version, modified_by, sequence";

/// A record from a row starting with [`RECORD_COLUMNS`], without groups.
fn record_from_row(r: &rusqlite::Row<'_>) -> Result<RemoteFile> {
    let path: String = r.get(0)?;
    let version: Vec<u8> = r.get(8)?;
    Ok(RemoteFile {
        path: RelPath::new(&path).map_err(|e| IndexError::Corrupt(format!("stored path: {e}")))?,
        kind: FileKind::from_sql(r.get(1)?)?,
        size: r.get::<_, i64>(2)? as u64,
        mtime_ns: r.get(3)?,
        permissions: r.get(4)?,
        hash: hash_from(r.get::<_, Option<Vec<u8>>>(5)?.as_deref())?,
        symlink_target: r.get(6)?,
        deleted: r.get(7)?,
        version: VersionVector::decode(&version)
            .map_err(|e| IndexError::Corrupt(format!("{path}: {e}")))?,
        modified_by: ShortId(r.get::<_, i64>(9)? as u64),
        sequence: r.get::<_, i64>(10)? as u64,
        groups: Vec::new(),
    })
}

/// A peer's record: [`RECORD_COLUMNS`], then `groups`.
fn remote_from_row(r: &rusqlite::Row<'_>) -> Result<RemoteFile> {
    let groups: Vec<u8> = r.get(11)?;
    Ok(RemoteFile {
        groups: decode_groups(&groups)?,
        ..record_from_row(r)?
    })
}

impl Index {
    fn device_row(&self, id: &DeviceId) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id FROM devices WHERE device_id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The peer's index epoch and highest sequence held for a folder
    /// (`(0, 0)` if nothing yet).
    pub fn remote_index_state(&self, folder: i64, device: &DeviceId) -> Result<(u64, u64)> {
        let Some(dev) = self.device_row(device)? else {
            return Ok((0, 0));
        };
        Ok(self
            .conn
            .query_row(
                "SELECT epoch, sequence FROM remote_index WHERE folder = ?1 AND device = ?2",
                [folder, dev],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .optional()?
            .unwrap_or((0, 0)))
    }

    /// Stores records a peer announced, in one transaction. A new epoch means
    /// the peer rebuilt its index: what was stored of it is dropped first.
    /// Returns how many records differ from the local version (0: nothing to
    /// pull, e.g. the peer announcing what it just pulled from here).
    pub fn store_remote(
        &mut self,
        folder: i64,
        device: &DeviceId,
        epoch: u64,
        sequence: u64,
        files: &[RemoteFile],
    ) -> Result<usize> {
        let dev = self
            .device_row(device)?
            .ok_or_else(|| IndexError::Corrupt(format!("device {device} is not paired")))?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut differ = 0;
        let stored: Option<i64> = tx
            .query_row(
                "SELECT epoch FROM remote_index WHERE folder = ?1 AND device = ?2",
                [folder, dev],
                |r| r.get(0),
            )
            .optional()?;
        if stored.is_some_and(|e| e as u64 != epoch) {
            tx.execute(
                "DELETE FROM remote_files WHERE folder = ?1 AND device = ?2",
                [folder, dev],
            )?;
        }
        {
            let mut upsert = tx.prepare_cached(
                "INSERT OR REPLACE INTO remote_files (folder, device, path, kind, size, mtime_ns,
                     permissions, hash, symlink_target, deleted, version, modified_by, sequence,
                     groups)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            let mut local =
                tx.prepare_cached("SELECT version FROM files WHERE folder = ?1 AND path = ?2")?;
            for f in files {
                let mine: Option<Vec<u8>> = local
                    .query_row(params![folder, f.path.as_str()], |r| r.get(0))
                    .optional()?;
                if mine.as_deref() != Some(&f.version.encode()[..]) {
                    differ += 1;
                }
                upsert.execute(params![
                    folder,
                    dev,
                    f.path.as_str(),
                    f.kind.to_sql(),
                    f.size as i64,
                    f.mtime_ns,
                    f.permissions,
                    f.hash.map(|h| h.0.to_vec()),
                    f.symlink_target,
                    f.deleted,
                    f.version.encode(),
                    f.modified_by.0 as i64,
                    f.sequence as i64,
                    encode_groups(&f.groups),
                ])?;
            }
        }
        tx.execute(
            "INSERT INTO remote_index (folder, device, epoch, sequence) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(folder, device) DO UPDATE SET epoch = excluded.epoch,
                 sequence = max(CASE WHEN remote_index.epoch = excluded.epoch
                                     THEN remote_index.sequence ELSE 0 END,
                                excluded.sequence)",
            params![folder, dev, epoch as i64, sequence as i64],
        )?;
        tx.commit()?;
        Ok(differ)
    }

    /// Every record peers announced for a folder, with the announcing device.
    pub fn remote_files(&self, folder: i64) -> Result<Vec<(DeviceId, RemoteFile)>> {
        let mut stmt = self.conn.prepare(
            "SELECT r.path, r.kind, r.size, r.mtime_ns, r.permissions, r.hash, r.symlink_target,
                    r.deleted, r.version, r.modified_by, r.sequence, r.groups, d.device_id
             FROM remote_files r JOIN devices d ON d.id = r.device
             WHERE r.folder = ?1 ORDER BY r.path",
        )?;
        let mut rows = stmt.query([folder])?;
        let mut out = Vec::new();
        // Parsing a device id decompresses a curve point: once per device.
        let mut ids: HashMap<String, DeviceId> = HashMap::new();
        while let Some(r) = rows.next()? {
            let dev: String = r.get(12)?;
            let dev = match ids.get(&dev) {
                Some(d) => *d,
                None => {
                    let d: DeviceId = dev
                        .parse()
                        .map_err(|e| IndexError::Corrupt(format!("device id {dev:?}: {e}")))?;
                    ids.insert(dev, d);
                    d
                }
            };
            out.push((dev, remote_from_row(r)?));
        }
        Ok(out)
    }

    /// One peer's record of a path.
    pub fn remote_file(
        &self,
        folder: i64,
        device: &DeviceId,
        path: &RelPath,
    ) -> Result<Option<RemoteFile>> {
        let Some(dev) = self.device_row(device)? else {
            return Ok(None);
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT path, kind, size, mtime_ns, permissions, hash, symlink_target, deleted,
                    version, modified_by, sequence, groups
             FROM remote_files WHERE folder = ?1 AND device = ?2 AND path = ?3",
        )?;
        let mut rows = stmt.query(params![folder, dev, path.as_str()])?;
        match rows.next()? {
            Some(r) => Ok(Some(remote_from_row(r)?)),
            None => Ok(None),
        }
    }

    /// Local records (tombstones included) with a sequence above `after`, in
    /// sequence order, at most `limit`.
    pub fn local_since(&self, folder: i64, after: u64, limit: usize) -> Result<Vec<LocalFile>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS}, inode, dev FROM files
             WHERE folder = ?1 AND sequence > ?2 ORDER BY sequence LIMIT ?3"
        ))?;
        let mut rows = stmt.query(params![folder, after as i64, limit as i64])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(local_from_row(r)?);
        }
        Ok(out)
    }

    /// Every local record of a folder (tombstones included), by path.
    pub fn local_files(&self, folder: i64) -> Result<HashMap<String, LocalFile>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {RECORD_COLUMNS}, inode, dev FROM files WHERE folder = ?1"
        ))?;
        let mut rows = stmt.query([folder])?;
        let mut out = HashMap::new();
        while let Some(r) = rows.next()? {
            let f = local_from_row(r)?;
            out.insert(f.record.path.as_str().to_owned(), f);
        }
        Ok(out)
    }

    /// One local record.
    pub fn local_file(&self, folder: i64, path: &RelPath) -> Result<Option<LocalFile>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS}, inode, dev FROM files WHERE folder = ?1 AND path = ?2"
        ))?;
        let mut rows = stmt.query(params![folder, path.as_str()])?;
        match rows.next()? {
            Some(r) => Ok(Some(local_from_row(r)?)),
            None => Ok(None),
        }
    }

    /// Where the chunk `hash` can be read: live files of any folder, at most
    /// `limit` places.
    pub fn chunk_sources(&self, hash: &ChunkHash, limit: usize) -> Result<Vec<ChunkSource>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT fo.path, f.path, c.offset, c.size
             FROM chunks c JOIN files f ON f.id = c.file JOIN folders fo ON fo.id = f.folder
             WHERE c.hash = ?1 AND f.deleted = 0 LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![&hash.0[..], limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, u32>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (root, path, offset, size) = row?;
            let rel = RelPath::new(&path).map_err(|e| IndexError::Corrupt(e.to_string()))?;
            out.push(ChunkSource {
                path: rel.to_fs(std::path::Path::new(&root)),
                offset: offset as u64,
                size,
            });
        }
        Ok(out)
    }

    /// [`Index::chunk_sources`] for many chunks at once (a few queries for
    /// thousands of hashes): the chunks found, each with at most `limit`
    /// places.
    pub fn chunk_sources_of(
        &self,
        hashes: &[ChunkHash],
        limit: usize,
    ) -> Result<HashMap<ChunkHash, Vec<ChunkSource>>> {
        const BATCH: usize = 256;
        let mut out: HashMap<ChunkHash, Vec<ChunkSource>> = HashMap::new();
        let mut unique = hashes.to_vec();
        unique.sort_unstable_by_key(|h| h.0);
        unique.dedup();
        for part in unique.chunks(BATCH) {
            let marks = vec!["?"; part.len()].join(",");
            let mut stmt = self.conn.prepare_cached(&format!(
                "SELECT c.hash, fo.path, f.path, c.offset, c.size
                 FROM chunks c JOIN files f ON f.id = c.file JOIN folders fo ON fo.id = f.folder
                 WHERE c.hash IN ({marks}) AND f.deleted = 0"
            ))?;
            let keys: Vec<&[u8]> = part.iter().map(|h| &h.0[..]).collect();
            let mut rows = stmt.query(rusqlite::params_from_iter(keys))?;
            while let Some(r) = rows.next()? {
                let hash = ChunkHash::from_slice(&r.get::<_, Vec<u8>>(0)?)
                    .ok_or_else(|| IndexError::Corrupt("a chunk hash of the wrong size".into()))?;
                let places = out.entry(hash).or_default();
                if places.len() >= limit {
                    continue;
                }
                let (root, path) = (r.get::<_, String>(1)?, r.get::<_, String>(2)?);
                let rel = RelPath::new(&path).map_err(|e| IndexError::Corrupt(e.to_string()))?;
                places.push(ChunkSource {
                    path: rel.to_fs(std::path::Path::new(&root)),
                    offset: r.get::<_, i64>(3)? as u64,
                    size: r.get(4)?,
                });
            }
        }
        Ok(out)
    }

    /// Where the chunk `hash` can be read inside one folder (what a peer may
    /// be served from).
    pub fn chunk_sources_in(
        &self,
        folder: i64,
        hash: &ChunkHash,
        limit: usize,
    ) -> Result<Vec<(RelPath, u64, u32)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT f.path, c.offset, c.size
             FROM chunks c JOIN files f ON f.id = c.file
             WHERE c.hash = ?1 AND f.folder = ?2 AND f.deleted = 0 LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![&hash.0[..], folder, limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, u32>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (path, offset, size) = row?;
            let rel = RelPath::new(&path).map_err(|e| IndexError::Corrupt(e.to_string()))?;
            out.push((rel, offset as u64, size));
        }
        Ok(out)
    }

    /// The chunk list of some live local file whose content hashes to `hash`.
    pub fn chunks_of_content(&self, hash: &FileHash) -> Result<Option<Vec<ChunkInfo>>> {
        // `hash IS NOT NULL` lets the partial index serve whatever is bound,
        // so SQLite does not re-prepare the statement on every call.
        let id: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT id FROM files
                 WHERE hash = ?1 AND hash IS NOT NULL AND deleted = 0 AND kind = 0 LIMIT 1",
            )?
            .query_row([&hash.0[..]], |r| r.get(0))
            .optional()?;
        let Some(id) = id else { return Ok(None) };
        let mut stmt = self
            .conn
            .prepare_cached("SELECT offset, size, hash FROM chunks WHERE file = ?1 ORDER BY idx")?;
        let rows = stmt.query_map([id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (offset, len, h) = row?;
            out.push(ChunkInfo {
                offset: offset as u64,
                len,
                hash: ChunkHash::from_slice(&h)
                    .ok_or_else(|| IndexError::Corrupt("chunk hash length".into()))?,
            });
        }
        Ok(Some(out))
    }

    /// Reserves history rows for the live versions at `paths` that pulls are
    /// about to replace, in one transaction committed before returning (inside
    /// a [`Index::batch`] it joins it instead): the rows must be durable before
    /// the files move, or a kill between the move and the pull's commit would
    /// leave the version's bytes set aside with no row. A reserved row is not a
    /// version until [`Index::record_pulled_reserved`] commits it (see
    /// `schema`, `history.reserved`). Returns, per path, the row id (`None`: no
    /// live record there). A version kept already (reserved by a pull killed
    /// before its commit, and maybe settled since) keeps its row: the pull
    /// retried reuses it rather than keeping the version twice.
    pub fn reserve_superseded(
        &mut self,
        folder: i64,
        paths: &[(&RelPath, Superseded)],
    ) -> Result<Vec<Option<i64>>> {
        if self.conn.is_autocommit() {
            // Fsynced: files move after it, and a power cut must not undo it
            // while keeping the moves.
            return self.durably(|tx| reserve_in(tx, folder, paths));
        }
        reserve_in(&self.conn, folder, paths)
    }

    /// Records that a remote version of a path is now on disk. With
    /// `superseded`, the version it replaces is kept in the history: its row is
    /// reserved and committed first ([`Index::reserve_superseded`]), then
    /// [`Index::record_pulled_reserved`] moves and records. Inside a
    /// [`Index::batch`] both join the batch's transaction, so a kill after the
    /// move loses the row: callers that batch reserve before the batch.
    pub fn record_pulled(
        &mut self,
        folder: i64,
        path: &RelPath,
        pulled: Pulled<'_>,
        superseded: Option<Superseded>,
        place: impl FnOnce(Option<i64>) -> std::io::Result<Option<FileMeta>>,
    ) -> Result<()> {
        let reserved = match superseded {
            Some(reason) => self.reserve_superseded(folder, &[(path, reason)])?[0],
            None => None,
        };
        self.record_pulled_reserved(folder, path, pulled, reserved, place)
    }

    /// Records that a remote version of a path is now on disk, in one
    /// savepoint: on its own a transaction, inside [`Index::batch`] it rolls
    /// back only this file if `place` fails. `reserved` is the row
    /// [`Index::reserve_superseded`] kept for the version being replaced; it
    /// becomes a version here, and `place` receives its id (to set that
    /// version's bytes aside under it) after checking it is still there. If
    /// `place` fails nothing is recorded, and the row stays reserved for a
    /// retry or for the history ingest to settle.
    pub fn record_pulled_reserved(
        &mut self,
        folder: i64,
        path: &RelPath,
        pulled: Pulled<'_>,
        reserved: Option<i64>,
        place: impl FnOnce(Option<i64>) -> std::io::Result<Option<FileMeta>>,
    ) -> Result<()> {
        if self.conn.is_autocommit() {
            // On its own: a savepoint would begin a deferred transaction,
            // which reads before it writes (see `Index::open`).
            return self.batch(|i| i.record_pulled_reserved(folder, path, pulled, reserved, place));
        }
        let tx = self.conn.savepoint()?;
        if let Some(id) = reserved {
            let found: Option<bool> = tx
                .prepare_cached("SELECT reserved FROM history WHERE id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            match found {
                // Settled as never used between the two transactions (by
                // another connection): nothing has moved yet.
                None => return Err(IndexError::ReservationGone(id)),
                Some(true) => {
                    tx.prepare_cached("UPDATE history SET reserved = 0 WHERE id = ?1")?
                        .execute([id])?;
                }
                Some(false) => {}
            }
        }
        let meta = place(reserved)?.unwrap_or(pulled.meta);
        let seq = next_sequence(&tx, folder)?;
        let r = pulled.remote;
        let id: i64 = tx.prepare_cached(UPSERT_FILE)?.query_row(
            params![
                folder,
                path.as_str(),
                r.kind.to_sql(),
                if r.deleted { 0 } else { r.size as i64 },
                meta.mtime_ns,
                meta.permissions,
                meta.inode as i64,
                meta.dev as i64,
                r.hash.map(|h| h.0.to_vec()),
                r.symlink_target,
                r.deleted,
                seq,
                pulled.version.encode(),
                r.modified_by.0 as i64,
            ],
            |row| row.get(0),
        )?;
        tx.prepare_cached("DELETE FROM chunks WHERE file = ?1")?
            .execute([id])?;
        {
            let mut add = tx.prepare_cached(
                "INSERT INTO chunks (file, idx, offset, size, hash) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (i, c) in pulled.chunks.iter().enumerate() {
                add.execute(params![id, i as i64, c.offset as i64, c.len, &c.hash.0[..]])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Gives a local record a new version (merged with a peer's concurrent one
    /// of the same content) and a new sequence, so peers converge on it; only
    /// if the record is still at sequence `seen` (the one the merge was
    /// planned on: a scan may have recorded a local change since). Returns
    /// whether it did.
    pub fn set_local_version(
        &mut self,
        folder: i64,
        path: &RelPath,
        seen: u64,
        version: &VersionVector,
    ) -> Result<bool> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let seq = next_sequence(&tx, folder)?;
        let n = tx.execute(
            "UPDATE files SET version = ?3, sequence = ?4
             WHERE folder = ?1 AND path = ?2 AND sequence = ?5",
            params![folder, path.as_str(), version.encode(), seq, seen as i64],
        )?;
        if n == 0 {
            return Ok(false);
        }
        tx.commit()?;
        Ok(true)
    }

    /// The local sequence of the record at `path` (`None`: no record), which
    /// changes whenever the record does.
    pub fn local_sequence(&self, folder: i64, path: &RelPath) -> Result<Option<u64>> {
        Ok(self
            .conn
            .prepare_cached("SELECT sequence FROM files WHERE folder = ?1 AND path = ?2")?
            .query_row(params![folder, path.as_str()], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|s| s as u64))
    }

    /// Records a conflict once (the same pair of versions is not recorded twice).
    /// Returns whether it was new.
    pub fn record_conflict(
        &self,
        folder: i64,
        path: &RelPath,
        conflict_path: &RelPath,
        (local, remote): (&VersionVector, &VersionVector),
        remote_device: &DeviceId,
        local_won: bool,
    ) -> Result<bool> {
        let (l, r) = (local.encode(), remote.encode());
        let exists: Option<i64> = self
            .conn
            .query_row(
                "SELECT id FROM conflicts WHERE folder = ?1 AND path = ?2
                   AND ((local_version = ?3 AND remote_version = ?4)
                     OR (local_version = ?4 AND remote_version = ?3))",
                params![folder, path.as_str(), l, r],
                |row| row.get(0),
            )
            .optional()?;
        if exists.is_some() {
            return Ok(false);
        }
        self.conn.execute(
            "INSERT INTO conflicts (folder, path, conflict_path, local_version, remote_version,
                                    remote_device, detected_at, local_won)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                folder,
                path.as_str(),
                conflict_path.as_str(),
                l,
                r,
                remote_device.to_string(),
                now_secs(),
                local_won
            ],
        )?;
        Ok(true)
    }
}

/// A recorded conflict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConflictRecord {
    /// Row id.
    pub id: i64,
    /// The folder id.
    pub folder: String,
    /// The file.
    pub path: String,
    /// Where the losing version was kept.
    pub conflict_path: String,
    /// The device whose version met the local one.
    pub remote_device: String,
    /// When it was found (Unix seconds).
    pub detected_at: i64,
    /// When it was resolved, if it was.
    pub resolved_at: Option<i64>,
    /// Whether this device's version stayed at `path` (else it is the copy at
    /// `conflict_path`); unknown for conflicts recorded before schema v7.
    pub local_won: Option<bool>,
}

/// How much of this device's current state of a folder a peer has, as far as
/// the peer's announced index says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerCompletion {
    /// The peer's device id.
    pub device: String,
    /// Its name here.
    pub name: String,
    /// Live items here (files, directories, symlinks).
    pub items: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Items the peer lacks or holds in another version (deletes it has not
    /// applied included).
    pub need_items: u64,
    /// Bytes of the files it lacks.
    pub need_bytes: u64,
}

impl PeerCompletion {
    /// Percent of the bytes the peer has (items when the folder has no bytes).
    pub fn completion(&self) -> f64 {
        if self.need_items == 0 {
            100.0
        } else if self.bytes > 0 {
            100.0 * (self.bytes - self.need_bytes.min(self.bytes)) as f64 / self.bytes as f64
        } else {
            100.0 * (self.items - self.need_items.min(self.items)) as f64 / self.items.max(1) as f64
        }
    }
}

impl Index {
    /// For each device `folder` is shared with, how much of this device's
    /// current state it has.
    pub fn peer_completion(&self, folder: i64) -> Result<Vec<PeerCompletion>> {
        // One pass over the folder's records and each peer's announced ones:
        // a live record is needed unless the peer has the same kind and
        // content; a delete is needed while the peer still has the file.
        let mut stmt = self.conn.prepare_cached(
            "WITH x AS (
                 SELECT fd.device, f.size, f.deleted,
                        r.path IS NULL OR r.deleted = 1 OR r.kind != f.kind
                            OR r.hash IS NOT f.hash
                            OR r.symlink_target IS NOT f.symlink_target AS differs,
                        r.deleted = 0 AS peer_live
                 FROM folder_devices fd
                 JOIN files f ON f.folder = fd.folder
                 LEFT JOIN remote_files r
                   ON r.folder = f.folder AND r.device = fd.device AND r.path = f.path
                 WHERE fd.folder = ?1)
             SELECT d.device_id, d.name,
                    COUNT(x.device) FILTER (WHERE x.deleted = 0),
                    COALESCE(SUM(x.size) FILTER (WHERE x.deleted = 0), 0),
                    COUNT(x.device) FILTER (WHERE x.deleted = 0 AND x.differs),
                    COALESCE(SUM(x.size) FILTER (WHERE x.deleted = 0 AND x.differs), 0),
                    COUNT(x.device) FILTER (WHERE x.deleted = 1 AND x.peer_live)
             FROM folder_devices fd JOIN devices d ON d.id = fd.device
             LEFT JOIN x ON x.device = fd.device
             WHERE fd.folder = ?1
             GROUP BY fd.device ORDER BY d.name, d.device_id",
        )?;
        let rows = stmt.query_map([folder], |r| {
            Ok(PeerCompletion {
                device: r.get(0)?,
                name: r.get(1)?,
                items: r.get::<_, i64>(2)? as u64,
                bytes: r.get::<_, i64>(3)? as u64,
                need_items: (r.get::<_, i64>(4)? + r.get::<_, i64>(6)?) as u64,
                need_bytes: r.get::<_, i64>(5)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every conflict, newest first.
    pub fn conflicts(&self) -> Result<Vec<ConflictRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT c.id, f.folder_id, c.path, c.conflict_path, c.remote_device, c.detected_at,
                    c.resolved_at, c.local_won
             FROM conflicts c JOIN folders f ON f.id = c.folder
             ORDER BY c.detected_at DESC, c.id DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ConflictRecord {
                id: r.get(0)?,
                folder: r.get(1)?,
                path: r.get(2)?,
                conflict_path: r.get(3)?,
                remote_device: r.get(4)?,
                detected_at: r.get(5)?,
                resolved_at: r.get(6)?,
                local_won: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// [`Index::reserve_superseded`] inside the caller's transaction.
fn reserve_in(
    conn: &rusqlite::Connection,
    folder: i64,
    paths: &[(&RelPath, Superseded)],
) -> Result<Vec<Option<i64>>> {
    let now = now_secs();
    let mut live = conn
        .prepare_cached("SELECT id FROM files WHERE folder = ?1 AND path = ?2 AND deleted = 0")?;
    let mut kept = conn.prepare_cached(
        "SELECT h.id, h.reserved FROM files f JOIN history h
             ON h.folder = f.folder AND h.path = f.path AND h.version = f.version
         WHERE f.id = ?1 AND h.kind = f.kind AND h.hash IS f.hash
         ORDER BY h.id DESC LIMIT 1",
    )?;
    let mut refresh =
        conn.prepare_cached("UPDATE history SET superseded_at = ?2, reason = ?3 WHERE id = ?1")?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO history (folder, path, kind, size, mtime_ns, permissions, hash,
             symlink_target, version, modified_by, superseded_at, reason, reserved)
         SELECT folder, path, kind, size, mtime_ns, permissions, hash,
             symlink_target, version, modified_by, ?2, ?3, 1
         FROM files WHERE id = ?1",
    )?;
    let mut chunks = conn.prepare_cached(
        "INSERT INTO history_chunks (version, idx, offset, size, hash)
         SELECT ?2, idx, offset, size, hash FROM chunks WHERE file = ?1",
    )?;
    let mut out = Vec::with_capacity(paths.len());
    for (path, reason) in paths {
        let file: Option<i64> = live
            .query_row(params![folder, path.as_str()], |r| r.get(0))
            .optional()?;
        let Some(file) = file else {
            out.push(None);
            continue;
        };
        let found: Option<(i64, bool)> = kept
            .query_row([file], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let id = match found {
            Some((id, reserved)) => {
                if reserved {
                    refresh.execute(params![id, now, reason.as_sql()])?;
                }
                id
            }
            None => {
                insert.execute(params![file, now, reason.as_sql()])?;
                let id = conn.last_insert_rowid();
                chunks.execute([file, id])?;
                id
            }
        };
        out.push(Some(id));
    }
    Ok(out)
}

/// A local record: [`RECORD_COLUMNS`], then `inode, dev`.
fn local_from_row(r: &rusqlite::Row<'_>) -> Result<LocalFile> {
    let record = record_from_row(r)?;
    let meta = FileMeta {
        kind: record.kind,
        size: record.size,
        mtime_ns: record.mtime_ns,
        permissions: record.permissions,
        inode: r.get::<_, i64>(11)? as u64,
        dev: r.get::<_, i64>(12)? as u64,
    };
    Ok(LocalFile { record, meta })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_round_trip_through_their_column() {
        let g = vec![
            ChunkGroup {
                hash: [3; 32],
                chunks: 7,
                size: 1 << 40,
            },
            ChunkGroup {
                hash: [9; 32],
                chunks: 1,
                size: 5,
            },
        ];
        assert_eq!(decode_groups(&encode_groups(&g)).unwrap(), g);
        assert!(decode_groups(&[0; 43]).is_err());
    }
}
