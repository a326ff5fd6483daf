//! The SQLite index: what this device knows about its folders, files, chunks and
//! devices. Opening applies the migrations in [`schema`]; every change is made in
//! a transaction, so a crash leaves either the old state or the new one.

mod devices;
mod history;
mod remote;
pub mod schema;
mod secrets;
mod store;
mod vault;

pub use devices::{Offer, Peer};
pub use history::{
    CaptureCandidate, EntryAt, HistoryReason, HistoryTotals, HistoryTx, HistoryVersion, Kept,
    LocalHistory, OpenConflict, PathAt, PendingVersion, ReservedVersion, VersionChunk,
};
pub use remote::{
    ChunkSource, ConflictRecord, LocalFile, PeerCompletion, Pulled, RemoteFile, Superseded,
    decode_groups, encode_groups,
};
pub use store::{ChunkLocation, DroppedChunks, PackRow, PackUsage, StoreTotals, StoredChunk};
pub use vault::{HolderState, LegacyChunk, Offered, RecordPage, VaultInfo};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};

use crate::chunking::{ChunkHash, ChunkInfo, FileHash};
use crate::device::{DeviceId, ShortId};
use crate::folder::{FolderId, FolderType};
use crate::relpath::RelPath;
use crate::version_vector::VersionVector;

/// Why the index could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Another process holds the write lock for longer than the busy timeout.
    #[error(
        "the index database is locked by another process (is a ferry agent or another ferry command running?)"
    )]
    Locked,
    /// The file is not SQLite, or is another program's SQLite database.
    #[error("not a ferry database (is it another program's file?)")]
    NotFerry(PathBuf),
    /// Written by a newer ferry.
    #[error(
        "schema version {found} is newer than this ferry understands ({supported}): upgrade ferry"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest version this build knows.
        supported: usize,
    },
    /// A row holds something ferry never writes.
    #[error("the index holds a malformed value: {0}")]
    Corrupt(String),
    /// The same folder id or path is already in the index.
    #[error("{0}")]
    Duplicate(String),
    /// Any other SQLite failure.
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    /// A filesystem step that had to succeed inside a transaction failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The history row a pull reserved for the version it replaces was
    /// settled meanwhile (by the history ingest): nothing was moved.
    #[error("the history entry kept for the replaced version was settled meanwhile; pull again")]
    ReservationGone(i64),
    /// No folder has this row id (it was removed meanwhile).
    #[error("the folder was removed from the index meanwhile")]
    UnknownFolder(i64),
}

impl From<rusqlite::Error> for IndexError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => IndexError::Locked,
            _ => IndexError::Sqlite(e),
        }
    }
}

/// Result alias for index operations.
pub type Result<T, E = IndexError> = std::result::Result<T, E>;

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link, recorded as a link and never followed.
    Symlink,
}

impl FileKind {
    fn to_sql(self) -> i64 {
        match self {
            FileKind::File => 0,
            FileKind::Dir => 1,
            FileKind::Symlink => 2,
        }
    }

    fn from_sql(v: i64) -> Result<Self> {
        match v {
            0 => Ok(FileKind::File),
            1 => Ok(FileKind::Dir),
            2 => Ok(FileKind::Symlink),
            _ => Err(IndexError::Corrupt(format!("file kind {v}"))),
        }
    }

    /// The kind's number in the wire protocol (the same as in the schema).
    pub fn to_wire(self) -> u8 {
        self.to_sql() as u8
    }

    /// The kind a wire number names, if any.
    pub fn from_wire(v: u8) -> Option<Self> {
        Self::from_sql(v as i64).ok()
    }
}

/// A folder as the index holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    /// Row id, for the other tables.
    pub row: i64,
    /// The id shared with peers.
    pub id: FolderId,
    /// A human name.
    pub label: String,
    /// The folder root (absolute, canonical when added).
    pub path: PathBuf,
    /// Which directions changes flow.
    pub folder_type: FolderType,
    /// The last local sequence number handed out.
    pub sequence: i64,
    /// The last scan's error, if it failed.
    pub error: Option<String>,
    /// When the last scan finished without error (Unix seconds).
    pub last_scan_at: Option<i64>,
    /// Deletes the last scan held back (too many at once) until confirmed.
    pub held_deletes: u64,
    /// The index epoch peers see (random, never 0; see `schema`).
    pub epoch: u64,
}

/// The stat fields that tell whether a file changed since it was hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    /// File, directory or symlink.
    pub kind: FileKind,
    /// Bytes (0 for directories; the target's length for symlinks).
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Unix permission bits (`mode & 0o7777`).
    pub permissions: u32,
    /// Inode number.
    pub inode: u64,
    /// Device number of the filesystem.
    pub dev: u64,
}

/// What the scanner compares a directory entry with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The stat fields last recorded.
    pub meta: FileMeta,
    /// Whether the record is a tombstone.
    pub deleted: bool,
    /// The content hash, for files.
    pub hash: Option<FileHash>,
    /// The link target, for symlinks.
    pub symlink_target: Option<String>,
}

/// What a local change did to a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// New content, hashed.
    Content {
        /// The whole-file hash.
        hash: FileHash,
        /// Its chunks.
        chunks: Vec<ChunkInfo>,
    },
    /// Only metadata (mtime, permissions) changed; the content is as recorded.
    Metadata,
    /// A directory appeared or changed permissions.
    Dir,
    /// A symlink appeared or now points elsewhere.
    Symlink(String),
    /// The path is gone.
    Deleted,
    /// Nothing a peer could see changed (the inode moved, say): refresh the stat
    /// cache without a new version.
    Refresh,
}

/// One local change to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalChange {
    /// Which path.
    pub path: RelPath,
    /// Its stat fields now (for deletes, the last ones known).
    pub meta: FileMeta,
    /// What changed.
    pub change: Change,
}

/// A file record as `ferry ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// Path in the folder.
    pub path: RelPath,
    /// Stat fields.
    pub meta: FileMeta,
    /// Content hash (files only).
    pub hash: Option<FileHash>,
    /// Link target (symlinks only).
    pub symlink_target: Option<String>,
    /// Tombstone?
    pub deleted: bool,
    /// Local sequence number of the last change.
    pub sequence: i64,
    /// Version vector.
    pub version: VersionVector,
    /// Device that made this version.
    pub modified_by: ShortId,
    /// Number of chunks.
    pub chunk_count: u64,
}

/// Per-folder totals of live records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderStats {
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Bytes in regular files.
    pub bytes: u64,
    /// Tombstones.
    pub deleted: u64,
}

/// A device row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The device's id.
    pub id: DeviceId,
    /// Its name.
    pub name: String,
    /// Whether it is this device.
    pub is_local: bool,
}

/// An open index database.
pub struct Index {
    conn: Connection,
    path: PathBuf,
    /// Which folders keep the versions local edits replace.
    local_history: history::LocalHistory,
}

/// The current time in Unix seconds.
pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Index {
    /// Opens (creating if needed) and migrates the index at `path`.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<Self> {
        let not_ferry = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => IndexError::NotFerry(path.to_owned()),
            _ => IndexError::from(e),
        };
        let mut conn = Connection::open(path).map_err(not_ferry)?;
        conn.busy_timeout(busy_timeout)?;
        // Every transaction takes the write lock when it begins. A deferred
        // one that reads before it writes fails at once, without waiting out
        // the busy timeout, when another connection commits between its read
        // and its write (SQLITE_BUSY_SNAPSHOT): at link-up the link's first
        // index update used to do that to the recording of the link.
        conn.set_transaction_behavior(TransactionBehavior::Immediate);
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(not_ferry)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(not_ferry)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "could not switch the index to WAL mode");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Room for every statement of the hot paths (pulls, scans, serving
        // chunks), so none is parsed again per file.
        conn.set_prepared_statement_cache_capacity(128);
        // Plans must not depend on bound values: otherwise SQLite re-prepares
        // a cached statement whenever a value it planned with changes (e.g. a
        // join with a partial index), which was about a tenth of a pull's CPU.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        migrate(&mut conn, path, schema::MIGRATIONS.len())?;
        Ok(Self {
            conn,
            path: path.to_owned(),
            local_history: history::LocalHistory::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// SQLite's `PRAGMA integrity_check`: empty when the database is sound,
    /// else the problems it lists.
    pub fn integrity_problems(&self) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let lines = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(lines.into_iter().filter(|l| l != "ok").collect())
    }

    /// The schema version this ferry writes (an opened index is migrated to it).
    pub fn current_schema_version() -> i64 {
        schema::MIGRATIONS.len() as i64
    }

    /// Records this device (id and name); replaces an earlier name.
    pub fn set_local_device(&self, id: DeviceId, name: &str) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "UPDATE devices SET is_local = 0 WHERE is_local = 1 AND device_id != ?1",
            [id.to_string()],
        )?;
        tx.execute(
            "INSERT INTO devices (device_id, short_id, name, is_local, added_at)
             VALUES (?1, ?2, ?3, 1, ?4)
             ON CONFLICT(device_id) DO UPDATE SET name = excluded.name, is_local = 1",
            params![id.to_string(), id.short().0 as i64, name, now_secs()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The devices this index knows, this one first.
    pub fn devices(&self) -> Result<Vec<Device>> {
        let mut stmt = self.conn.prepare(
            "SELECT device_id, name, is_local FROM devices ORDER BY is_local DESC, name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (id, name, is_local) = row?;
            let id = id
                .parse()
                .map_err(|e| IndexError::Corrupt(format!("device id {id:?}: {e}")))?;
            Ok(Device { id, name, is_local })
        })
        .collect()
    }

    /// Adds a folder with a fresh random vault secret; `prepare` runs inside the
    /// transaction (to create the folder's marker) and its failure leaves the
    /// index unchanged.
    pub fn add_folder(
        &mut self,
        id: &FolderId,
        label: &str,
        path: &Path,
        folder_type: FolderType,
        prepare: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<Folder> {
        let path_str = path
            .to_str()
            .ok_or_else(|| IndexError::Duplicate(format!("{} is not UTF-8", path.display())))?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let clash: Option<(String, String)> = tx
            .query_row(
                "SELECT folder_id, path FROM folders WHERE folder_id = ?1 OR path = ?2",
                params![id.as_str(), path_str],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((other_id, other_path)) = clash {
            return Err(IndexError::Duplicate(if other_id == id.as_str() {
                format!("a folder with id {other_id} already exists (at {other_path})")
            } else {
                format!("{other_path} is already added as folder {other_id}")
            }));
        }
        tx.execute(
            "INSERT INTO folders (folder_id, label, path, folder_type, created_at, epoch)
             VALUES (?1, ?2, ?3, ?4, ?5, (abs(random()) % 9007199254740000) + 1)",
            params![
                id.as_str(),
                label,
                path_str,
                folder_type.as_str(),
                now_secs()
            ],
        )?;
        secrets::insert_fresh(&tx, tx.last_insert_rowid())?;
        prepare()?;
        tx.commit()?;
        self.folder(id)?
            .ok_or_else(|| IndexError::Corrupt("folder vanished after insert".into()))
    }

    /// All folders, by id.
    pub fn folders(&self) -> Result<Vec<Folder>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {FOLDER_COLUMNS} FROM folders ORDER BY folder_id"
        ))?;
        let rows = stmt.query_map([], folder_row)?;
        rows.map(|r| r?).collect()
    }

    /// One folder by id.
    pub fn folder(&self, id: &FolderId) -> Result<Option<Folder>> {
        self.conn
            .query_row(
                &format!("SELECT {FOLDER_COLUMNS} FROM folders WHERE folder_id = ?1"),
                [id.as_str()],
                folder_row,
            )
            .optional()?
            .transpose()
    }

    /// Forgets a folder and everything recorded about its files. Returns whether
    /// it existed. Never touches the files themselves.
    pub fn remove_folder(&mut self, id: &FolderId) -> Result<bool> {
        let n = self
            .conn
            .execute("DELETE FROM folders WHERE folder_id = ?1", [id.as_str()])?;
        Ok(n > 0)
    }

    /// Records the outcome of a scan: an error, or success at `now`.
    pub fn set_scan_result(&self, folder: i64, error: Option<&str>) -> Result<()> {
        match error {
            Some(e) => self.conn.execute(
                "UPDATE folders SET error = ?2 WHERE id = ?1",
                params![folder, e],
            )?,
            None => self.conn.execute(
                "UPDATE folders SET error = NULL, last_scan_at = ?2 WHERE id = ?1",
                params![folder, now_secs()],
            )?,
        };
        Ok(())
    }

    /// Notes how many deletes the last scan held back (0: none).
    pub fn set_held_deletes(&self, folder: i64, n: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE folders SET held_deletes = ?2 WHERE id = ?1",
            params![folder, n as i64],
        )?;
        Ok(())
    }

    /// What the scanner needs to know of every record in a folder, by path.
    pub fn scan_snapshot(&self, folder: i64) -> Result<HashMap<String, Known>> {
        let mut stmt = self.conn.prepare(
            "SELECT path, kind, size, mtime_ns, permissions, inode, dev, deleted, hash,
                    symlink_target
             FROM files WHERE folder = ?1",
        )?;
        let mut rows = stmt.query([folder])?;
        let mut out = HashMap::new();
        while let Some(r) = rows.next()? {
            let meta = meta_from_row(r, 1)?;
            out.insert(
                r.get::<_, String>(0)?,
                Known {
                    meta,
                    deleted: r.get(7)?,
                    hash: hash_from(r.get::<_, Option<Vec<u8>>>(8)?.as_deref())?,
                    symlink_target: r.get(9)?,
                },
            );
        }
        Ok(out)
    }

    /// Records local changes in one transaction, bumping this device's counter in
    /// each changed file's version vector and giving each a new sequence number.
    pub fn apply_local_changes(
        &mut self,
        folder: i64,
        me: ShortId,
        changes: &[LocalChange],
    ) -> Result<()> {
        let keep_local = self.keeps_local_history(folder)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut seq: i64 = tx.query_row(
            "SELECT sequence FROM folders WHERE id = ?1",
            [folder],
            |r| r.get(0),
        )?;
        {
            let mut get =
                tx.prepare_cached("SELECT id, version FROM files WHERE folder = ?1 AND path = ?2")?;
            let mut upsert = tx.prepare_cached(UPSERT_FILE)?;
            let mut refresh = tx.prepare_cached(
                "UPDATE files SET inode = ?3, dev = ?4, mtime_ns = ?5
                 WHERE folder = ?1 AND path = ?2",
            )?;
            let mut old_hash = tx.prepare_cached("SELECT hash FROM files WHERE id = ?1")?;
            let mut clear_chunks = tx.prepare_cached("DELETE FROM chunks WHERE file = ?1")?;
            let mut add_chunk = tx.prepare_cached(
                "INSERT INTO chunks (file, idx, offset, size, hash) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;

            for c in changes {
                let m = &c.meta;
                if c.change == Change::Refresh {
                    refresh.execute(params![
                        folder,
                        c.path.as_str(),
                        m.inode as i64,
                        m.dev as i64,
                        m.mtime_ns
                    ])?;
                    continue;
                }
                let existing: Option<(i64, Vec<u8>)> = get
                    .query_row(params![folder, c.path.as_str()], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                if keep_local
                    && c.change != Change::Metadata
                    && let Some((old, _)) = &existing
                {
                    history::keep_local_version(&tx, *old)?;
                }
                let version = match &existing {
                    Some((_, v)) => VersionVector::decode(v)
                        .map_err(|e| IndexError::Corrupt(format!("{}: {e}", c.path)))?,
                    None => VersionVector::new(),
                }
                .bumped(me);
                let (hash, target, deleted): (Option<Vec<u8>>, Option<&str>, bool) = match &c.change
                {
                    Change::Content { hash, .. } => (Some(hash.0.to_vec()), None, false),
                    Change::Metadata => {
                        let id = existing.as_ref().map(|e| e.0).unwrap_or(-1);
                        let h: Option<Vec<u8>> =
                            old_hash.query_row([id], |r| r.get(0)).optional()?.flatten();
                        (h, None, false)
                    }
                    Change::Dir => (None, None, false),
                    Change::Symlink(t) => (None, Some(t.as_str()), false),
                    Change::Deleted => (None, None, true),
                    Change::Refresh => unreachable!("handled above"),
                };
                seq += 1;
                let size = if deleted { 0 } else { m.size as i64 };
                let id: i64 = upsert.query_row(
                    params![
                        folder,
                        c.path.as_str(),
                        m.kind.to_sql(),
                        size,
                        m.mtime_ns,
                        m.permissions,
                        m.inode as i64,
                        m.dev as i64,
                        hash,
                        target,
                        deleted,
                        seq,
                        version.encode(),
                        me.0 as i64,
                    ],
                    |r| r.get(0),
                )?;
                match &c.change {
                    Change::Metadata => {}
                    Change::Content { chunks, .. } => {
                        clear_chunks.execute([id])?;
                        for (i, ch) in chunks.iter().enumerate() {
                            add_chunk.execute(params![
                                id,
                                i as i64,
                                ch.offset as i64,
                                ch.len,
                                &ch.hash.0[..]
                            ])?;
                        }
                    }
                    _ => {
                        clear_chunks.execute([id])?;
                    }
                }
            }
        }
        tx.execute(
            "UPDATE folders SET sequence = ?2 WHERE id = ?1",
            params![folder, seq],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Totals of a folder's live records.
    pub fn folder_stats(&self, folder: i64) -> Result<FolderStats> {
        let mut stmt = self.conn.prepare(
            "SELECT kind, deleted, COUNT(*), COALESCE(SUM(size), 0) FROM files
             WHERE folder = ?1 GROUP BY kind, deleted",
        )?;
        let mut rows = stmt.query([folder])?;
        let mut s = FolderStats::default();
        while let Some(r) = rows.next()? {
            let (kind, deleted, n, bytes): (i64, bool, i64, i64) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            if deleted {
                s.deleted += n as u64;
                continue;
            }
            match FileKind::from_sql(kind)? {
                FileKind::File => {
                    s.files += n as u64;
                    s.bytes += bytes as u64;
                }
                FileKind::Dir => s.dirs += n as u64,
                FileKind::Symlink => s.symlinks += n as u64,
            }
        }
        Ok(s)
    }

    /// The records at or under `under` (the whole folder if `None`), by path.
    pub fn list_files(
        &self,
        folder: i64,
        under: Option<&RelPath>,
        include_deleted: bool,
    ) -> Result<Vec<FileRecord>> {
        // Paths below `p` sort between "p/" and "p0" ('0' follows '/').
        let (exact, lo, hi) = match under {
            Some(p) => (p.as_str().to_owned(), format!("{p}/"), format!("{p}0")),
            None => (String::new(), String::new(), "\u{10FFFF}".to_owned()),
        };
        let mut stmt = self.conn.prepare(
            "SELECT path, kind, size, mtime_ns, permissions, inode, dev, deleted, hash,
                    symlink_target, sequence, version, modified_by,
                    (SELECT COUNT(*) FROM chunks WHERE file = files.id)
             FROM files
             WHERE folder = ?1 AND (path = ?2 OR (path >= ?3 AND path < ?4))
               AND (?5 OR deleted = 0)
             ORDER BY path",
        )?;
        let mut rows = stmt.query(params![folder, exact, lo, hi, include_deleted])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let path: String = r.get(0)?;
            let version: Vec<u8> = r.get(11)?;
            out.push(FileRecord {
                path: RelPath::new(&path)
                    .map_err(|e| IndexError::Corrupt(format!("stored path: {e}")))?,
                meta: meta_from_row(r, 1)?,
                deleted: r.get(7)?,
                hash: hash_from(r.get::<_, Option<Vec<u8>>>(8)?.as_deref())?,
                symlink_target: r.get(9)?,
                sequence: r.get(10)?,
                version: VersionVector::decode(&version)
                    .map_err(|e| IndexError::Corrupt(format!("{path}: {e}")))?,
                modified_by: ShortId(r.get::<_, i64>(12)? as u64),
                chunk_count: r.get::<_, i64>(13)? as u64,
            });
        }
        Ok(out)
    }

    /// Runs `f` in one write transaction: what it records commits together,
    /// once, or not at all if it returns an error. Pulls use it to record many
    /// small files with one commit (each file in its own savepoint).
    pub fn batch<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => match self.conn.execute_batch("COMMIT") {
                Ok(()) => Ok(v),
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    Err(e.into())
                }
            },
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// The chunks of a live file, in order.
    pub fn file_chunks(&self, folder: i64, path: &RelPath) -> Result<Vec<ChunkInfo>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT c.offset, c.size, c.hash FROM chunks c JOIN files f ON f.id = c.file
             WHERE f.folder = ?1 AND f.path = ?2 ORDER BY c.idx",
        )?;
        let rows = stmt.query_map(params![folder, path.as_str()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (offset, len, hash) = row?;
            Ok(ChunkInfo {
                offset: offset as u64,
                len,
                hash: ChunkHash::from_slice(&hash)
                    .ok_or_else(|| IndexError::Corrupt("chunk hash length".into()))?,
            })
        })
        .collect()
    }
}

/// An index shared by the agent's tasks; each use runs on tokio's blocking pool
/// so SQLite never stalls the async workers.
#[derive(Clone)]
pub struct SharedIndex(std::sync::Arc<std::sync::Mutex<Index>>);

impl SharedIndex {
    /// Wraps an open index.
    pub fn new(index: Index) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(index)))
    }

    /// Runs `f` with the index on this thread: for code already on the
    /// blocking pool.
    pub fn with<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        // A panic while holding the lock leaves the index itself consistent
        // (SQLite rolled back), so keep using it.
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Runs `f` with the index on the blocking pool.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Index) -> R + Send + 'static,
    ) -> R {
        let index = self.clone();
        tokio::task::spawn_blocking(move || index.with(f))
            .await
            .expect("index task panicked")
    }
}

/// Writes a file record (local changes and pulls alike); parameters: folder,
/// path, kind, size, mtime_ns, permissions, inode, dev, hash, symlink_target,
/// deleted, sequence, version, modified_by. Returns the row id.
const UPSERT_FILE: &str = "INSERT INTO files (folder, path, kind, size, mtime_ns, permissions,
        inode, dev, hash, symlink_target, deleted, sequence, version, modified_by)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
    ON CONFLICT(folder, path) DO UPDATE SET
        kind = excluded.kind, size = excluded.size, mtime_ns = excluded.mtime_ns,
        permissions = excluded.permissions, inode = excluded.inode, dev = excluded.dev,
        hash = excluded.hash, symlink_target = excluded.symlink_target,
        deleted = excluded.deleted, sequence = excluded.sequence, version = excluded.version,
        modified_by = excluded.modified_by
    RETURNING id";

/// Takes the folder's next sequence number, inside the caller's transaction.
fn next_sequence(tx: &Connection, folder: i64) -> Result<i64> {
    Ok(tx
        .prepare_cached(
            "UPDATE folders SET sequence = sequence + 1 WHERE id = ?1 RETURNING sequence",
        )?
        .query_row([folder], |r| r.get(0))?)
}

const FOLDER_COLUMNS: &str =
    "id, folder_id, label, path, folder_type, sequence, error, last_scan_at, held_deletes, epoch";

fn folder_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Folder>> {
    let id: String = r.get(1)?;
    let ty: String = r.get(4)?;
    let path: String = r.get(3)?;
    let (Ok(fid), Ok(folder_type)) = (FolderId::new(&id), ty.parse::<FolderType>()) else {
        return Ok(Err(IndexError::Corrupt(format!(
            "folder {id:?} of type {ty:?}"
        ))));
    };
    Ok(Ok(Folder {
        row: r.get(0)?,
        id: fid,
        label: r.get(2)?,
        path: PathBuf::from(path),
        folder_type,
        sequence: r.get(5)?,
        error: r.get(6)?,
        last_scan_at: r.get(7)?,
        held_deletes: r.get::<_, i64>(8)? as u64,
        epoch: r.get::<_, i64>(9)? as u64,
    }))
}

fn meta_from_row(r: &rusqlite::Row<'_>, first: usize) -> Result<FileMeta> {
    Ok(FileMeta {
        kind: FileKind::from_sql(r.get(first)?)?,
        size: r.get::<_, i64>(first + 1)? as u64,
        mtime_ns: r.get(first + 2)?,
        permissions: r.get(first + 3)?,
        inode: r.get::<_, i64>(first + 4)? as u64,
        dev: r.get::<_, i64>(first + 5)? as u64,
    })
}

fn hash_from(b: Option<&[u8]>) -> Result<Option<FileHash>> {
    b.map(|b| FileHash::from_slice(b).ok_or_else(|| IndexError::Corrupt("hash length".into())))
        .transpose()
}

/// Applies migrations until the database is at `target`.
fn migrate(conn: &mut Connection, path: &Path, target: usize) -> Result<()> {
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let app_id: i32 = tx.pragma_query_value(None, "application_id", |r| r.get(0))?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if app_id == 0 && version == 0 {
            let objects: i64 =
                tx.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))?;
            if objects > 0 {
                return Err(IndexError::NotFerry(path.to_owned()));
            }
        } else if app_id != schema::APPLICATION_ID {
            return Err(IndexError::NotFerry(path.to_owned()));
        }
        if version as usize > schema::MIGRATIONS.len() || version < 0 {
            return Err(IndexError::TooNew {
                path: path.to_owned(),
                found: version,
                supported: schema::MIGRATIONS.len(),
            });
        }
        let version = version as usize;
        if version >= target {
            return Ok(());
        }
        tx.execute_batch(schema::MIGRATIONS[version])?;
        tx.pragma_update(None, "application_id", schema::APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", (version + 1) as i64)?;
        tx.commit()?;
        tracing::debug!(version = version + 1, "migrated the index");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Index {
        Index::open(&dir.join("index.db"), Duration::from_millis(100)).unwrap()
    }

    #[test]
    fn a_fresh_database_is_at_the_latest_version_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let idx = open(dir.path());
        assert_eq!(
            idx.schema_version().unwrap(),
            schema::MIGRATIONS.len() as i64
        );
        let mode: String = idx
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn other_files_are_not_mistaken_for_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, b"just some text, long enough to have a header? no").unwrap();
        let err = Index::open(&text, Duration::ZERO).err().unwrap();
        assert!(matches!(err, IndexError::NotFerry(_)), "{err}");
        assert_eq!(
            std::fs::read(&text).unwrap(),
            b"just some text, long enough to have a header? no"
        );

        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x);")
            .unwrap();
        let err = Index::open(&other, Duration::ZERO).err().unwrap();
        assert!(matches!(err, IndexError::NotFerry(_)), "{err}");
    }

    #[test]
    fn a_database_of_the_previous_version_is_upgraded_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        // From version 8, so the folder secrets (9) are made for folders that
        // exist, offers (10) gain their flag, and 11 applies on top.
        let previous = 8;
        {
            let mut conn = Connection::open(&path).unwrap();
            migrate(&mut conn, &path, previous).unwrap();
            let v: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(v as usize, previous);
            conn.execute_batch(
                "INSERT INTO folders (folder_id, label, path, folder_type, sequence, created_at)
                 VALUES ('docs', 'Docs', '/srv/docs', 'send-only', 1, 0);
                 INSERT INTO folders (folder_id, label, path, folder_type, created_at)
                 VALUES ('pics', 'Pics', '/srv/pics', 'send-receive', 0);
                 INSERT INTO files (folder, path, kind, size, mtime_ns, permissions, hash,
                                    sequence, version, modified_by)
                 VALUES (1, 'a.txt', 0, 3, 7, 420, zeroblob(32), 1, X'00000000000000010000000000000001', 1);
                 INSERT INTO history (folder, path, kind, size, mtime_ns, permissions, hash,
                                      version, modified_by, superseded_at, reason, stored)
                 VALUES (1, 'a.txt', 0, 2, 5, 420, zeroblob(32), X'', 1, 6, 'replaced', 1);
                 INSERT INTO devices (device_id, short_id, name, added_at)
                 VALUES ('00', 9, 'peer', 0);
                 INSERT INTO folder_offers (device, folder_id, label, offered_at)
                 VALUES (1, 'music', 'Music', 0);",
            )
            .unwrap();
        }
        let mut idx = Index::open(&path, Duration::ZERO).unwrap();
        assert_eq!(
            idx.schema_version().unwrap(),
            schema::MIGRATIONS.len() as i64
        );
        // Folders from before vault secrets (schema 9) each got their own.
        let stored: Vec<(i64, Vec<u8>)> = idx
            .conn
            .prepare("SELECT folder, secret FROM folder_secrets ORDER BY folder")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(stored.len(), 2);
        assert_ne!(stored[0].1, stored[1].1);
        for (folder, bytes) in &stored {
            assert_eq!(
                idx.folder_secret(*folder).unwrap().as_bytes()[..],
                bytes[..]
            );
        }
        let f = idx
            .folder(&FolderId::new("docs").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(f.folder_type, FolderType::SendOnly);
        let files = idx.list_files(f.row, None, true).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].version.get(ShortId(1)), 1);
        // Versions kept before pulls reserved their rows (schema 8) stay
        // versions.
        let a = RelPath::new("a.txt").unwrap();
        let history = idx.history_of(f.row, Some(&a), false).unwrap();
        assert_eq!(history.len(), 1);
        assert!(history[0].stored);
        assert!(idx.history_reserved(i64::MAX).unwrap().is_empty());
        let totals = idx.store_totals().unwrap();
        assert_eq!(totals, StoreTotals::default());
        assert!(idx.store_unstored_history_chunks().unwrap().is_empty());
        // Offers from before encrypted shares (schema 10) are plain ones.
        let encrypted: i64 = idx
            .conn
            .query_row("SELECT encrypted FROM folder_offers", [], |r| r.get(0))
            .unwrap();
        assert_eq!(encrypted, 0);
    }

    #[test]
    fn a_version_5_database_gains_an_empty_chunk_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            migrate(&mut conn, &path, 5).unwrap();
            conn.execute_batch(
                "INSERT INTO folders (folder_id, label, path, folder_type, created_at)
                 VALUES ('docs', 'Docs', '/srv/docs', 'send-receive', 0);
                 INSERT INTO history (folder, path, kind, size, mtime_ns, permissions, hash,
                                      version, modified_by, superseded_at, reason)
                 VALUES (1, 'a.txt', 0, 3, 7, 420, zeroblob(32), X'', 1, 5, 'replaced');
                 INSERT INTO history_chunks (version, idx, offset, size, hash)
                 VALUES (1, 0, 0, 3, zeroblob(32));",
            )
            .unwrap();
        }
        let idx = Index::open(&path, Duration::ZERO).unwrap();
        assert!(idx.schema_version().unwrap() >= 6);
        assert_eq!(idx.store_totals().unwrap(), StoreTotals::default());
        assert_eq!(
            idx.store_unstored_history_chunks().unwrap(),
            vec![ChunkHash([0; 32])]
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        let conn = Connection::open(dir.path().join("index.db")).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
        drop(conn);
        let err = Index::open(&dir.path().join("index.db"), Duration::ZERO)
            .err()
            .unwrap();
        assert!(
            matches!(err, IndexError::TooNew { found: 999, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_write_lock_held_elsewhere_is_reported_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let mut idx = open(dir.path());
        let other = Connection::open(dir.path().join("index.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let err = idx
            .add_folder(
                &FolderId::new("f").unwrap(),
                "f",
                Path::new("/nowhere"),
                FolderType::SendReceive,
                || Ok(()),
            )
            .unwrap_err();
        assert!(matches!(err, IndexError::Locked), "{err}");
        other.execute_batch("ROLLBACK").unwrap();
        assert!(idx.folders().unwrap().is_empty());
    }
}
