//! Moving the versions a pull set aside (`<folder>/.ferry/versions/<id>`) into
//! the chunk store.
//!
//! Each pending file is cut by its version's chunk list and every chunk is
//! checked against its hash on the way into a [`PackWriter`]. Then, in this
//! order: the packs are flushed (fsynced, in place, their rows committed), the
//! versions are marked stored in one transaction, the writer is dropped (it
//! kept GC from dropping a chunk deduplicated against until the versions that
//! need it were committed), and only then are the files deleted. A crash at any
//! point leaves either a version still pending (tried again, deduplicated
//! against what reached the store) or a stored version whose file is still
//! there ([`sweep`] deletes it). A file that does not match its version (it was
//! changed or is damaged) is kept as it is, with a `<id>.damaged` marker beside
//! it so it is not tried again, and reported by `ferry history verify`.
//!
//! First, history rows a killed pull reserved and never committed are settled
//! ([`settle_reservations`]): a pull commits the row of the version it
//! replaces before it moves the file, so a kill leaves either a row whose
//! version never left its path (dropped) or one whose file was set aside
//! (kept, and ingested like any other). Until then the row is not listed,
//! counted, pruned, verified nor served: after a kill past the move the
//! version shows up at the agent's first history pass once the row is
//! `RESERVATION_GRACE` old, and the file under `.ferry/versions` is left
//! alone meanwhile.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use super::restore::check_layout;
use super::store::{ChunkStore, PackWriter, StoreError};
use super::{Result, damaged_marker, io_at, pending_file, sync_dir, versions_dir};
use crate::chunking::ChunkInfo;
use crate::folder::check_root;
use crate::index::{FileKind, Folder, Index, PendingVersion, ReservedVersion, now_secs};

/// Versions put through one writer before their rows are committed.
const BATCH_VERSIONS: usize = 64;
/// ... or this many bytes, whichever comes first.
const BATCH_BYTES: u64 = 256 << 20;
/// Reservations at least this old (seconds) are settled: a pull commits its
/// records right after reserving, so an older one was left by a kill (a
/// younger one may be a pull between its two transactions, which a settle
/// would only make try again).
const RESERVATION_GRACE: i64 = 60;

/// What an ingest pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// Versions moved into the store (or marked stored, having no bytes).
    pub versions: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes new to the store (the rest was deduplicated).
    pub bytes_written: u64,
    /// Versions whose pending file does not match them, kept as they are.
    pub damaged: Vec<(i64, String)>,
    /// Versions left for later (folder root missing, file missing).
    pub deferred: u64,
    /// Reservations of killed pulls whose version had left its path: kept as
    /// versions.
    pub reservations_kept: u64,
    /// Reservations of killed pulls whose version never left: dropped.
    pub reservations_dropped: u64,
}

/// Test seams: where an ingest stops as if the process were killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum CrashAt {
    Never,
    /// Packs committed, versions not marked stored.
    BeforeMark,
    /// Versions marked stored, files not deleted.
    BeforeDelete,
}

/// Why one pending file could not be ingested.
enum Problem {
    /// Try again later (the store could not be written, say).
    Later,
    /// Not again in this process: the file is gone, or marked damaged.
    Skip,
    /// The file does not match its version: keep it, mark it.
    Damaged(String),
}

/// Moves pending versions into the store until none are left (or `stop`
/// returns true between versions). `skip` holds versions not to try again in
/// this process (filled with those that fail).
pub fn ingest_pending(
    index: &mut Index,
    store: &ChunkStore,
    skip: &mut HashSet<i64>,
    stop: &dyn Fn() -> bool,
) -> Result<IngestReport> {
    let (kept, dropped) = settle_reservations(index, now_secs() - RESERVATION_GRACE)?;
    let mut report = ingest_until(index, store, skip, stop, CrashAt::Never)?;
    report.reservations_kept = kept;
    report.reservations_dropped = dropped;
    Ok(report)
}

/// Settles the history rows pulls reserved before `before` (Unix seconds)
/// and never committed: a row whose version left its path (the file is under
/// `.ferry/versions/<id>`; a link or directory is no longer at the path) is
/// kept as a version, one whose version never left is dropped. Folders whose
/// root is missing are left for later. Returns how many were kept and dropped.
pub fn settle_reservations(index: &mut Index, before: i64) -> Result<(u64, u64)> {
    let (mut kept, mut dropped) = (0, 0);
    let mut roots_ok: std::collections::HashMap<i64, bool> = Default::default();
    for r in index.history_reserved(before)? {
        let root_ok = *roots_ok
            .entry(r.folder)
            .or_insert_with(|| check_root(&folder_stub(r.folder, &r.root)).is_ok());
        if !root_ok {
            continue;
        }
        match index.history_settle_reserved(r.id, left_its_path)? {
            Some(true) => {
                tracing::info!(version = r.id, path = %r.path, "kept the version an interrupted pull had set aside");
                kept += 1;
            }
            Some(false) => {
                tracing::debug!(version = r.id, path = %r.path, "dropped the history row of a pull killed before it moved anything");
                dropped += 1;
            }
            None => {}
        }
    }
    Ok((kept, dropped))
}

/// Whether a reserved version left its path (`None`: cannot tell now).
fn left_its_path(v: &ReservedVersion) -> Option<bool> {
    let at = v.path.to_fs(&v.root);
    let gone = |r: io::Result<fs::Metadata>| match r {
        Ok(_) => Some(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some(true),
        Err(_) => None,
    };
    match v.kind {
        // A pull moves every file it replaces (empty ones too) aside.
        FileKind::File => gone(fs::symlink_metadata(pending_file(&v.root, v.id))).map(|g| !g),
        FileKind::Symlink => match fs::read_link(&at) {
            Ok(t) => Some(t.to_str() != v.symlink_target.as_deref()),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => Some(true),
            Err(e) => gone(Err(e)),
        },
        FileKind::Dir => match fs::symlink_metadata(&at) {
            Ok(m) => Some(!m.is_dir()),
            r => gone(r),
        },
    }
}

fn ingest_until(
    index: &mut Index,
    store: &ChunkStore,
    skip: &mut HashSet<i64>,
    stop: &dyn Fn() -> bool,
    crash: CrashAt,
) -> Result<IngestReport> {
    let mut report = IngestReport::default();
    let mut roots_ok: std::collections::HashMap<i64, bool> = Default::default();
    // Versions to try again in a later call (an unmounted folder comes back).
    let mut later: HashSet<i64> = HashSet::new();
    loop {
        let pending: Vec<PendingVersion> = index
            .history_pending(skip.len() + later.len() + BATCH_VERSIONS)?
            .into_iter()
            .filter(|p| !skip.contains(&p.id) && !later.contains(&p.id))
            .take(BATCH_VERSIONS)
            .collect();
        if pending.is_empty() || stop() {
            return Ok(report);
        }
        let mut writer = store.writer()?;
        let mut ready: Vec<&PendingVersion> = Vec::new();
        let mut bytes = 0u64;
        for p in &pending {
            if stop() || bytes >= BATCH_BYTES {
                break;
            }
            let root_ok = *roots_ok
                .entry(p.folder)
                .or_insert_with(|| check_root(&folder_stub(p.folder, &p.root)).is_ok());
            if p.kind != FileKind::File || p.size == 0 {
                ready.push(p);
                continue;
            }
            if !root_ok {
                later.insert(p.id);
                report.deferred += 1;
                continue;
            }
            match put_file(index, &mut writer, p) {
                Ok(()) => {
                    bytes += p.size;
                    ready.push(p);
                }
                Err(Problem::Later) => {
                    later.insert(p.id);
                    report.deferred += 1;
                }
                Err(Problem::Skip) => {
                    skip.insert(p.id);
                    report.deferred += 1;
                }
                Err(Problem::Damaged(why)) => {
                    skip.insert(p.id);
                    tracing::warn!(
                        version = p.id, path = %p.path,
                        "a version set aside by a pull does not match its record ({why}); keeping its file as it is"
                    );
                    let marker = damaged_marker(&p.root, p.id);
                    if let Err(e) = fs::write(&marker, format!("{why}\n")) {
                        tracing::warn!("{}: {e}", marker.display());
                    }
                    report.damaged.push((p.id, why));
                }
            }
        }
        writer.flush(index)?;
        if crash == CrashAt::BeforeMark {
            return Ok(report);
        }
        let ids: Vec<i64> = ready.iter().map(|p| p.id).collect();
        index.history_mark_stored(&ids)?;
        report.bytes_written += writer.stats().bytes_written;
        drop(writer);
        report.versions += ids.len() as u64;
        report.bytes += ready.iter().map(|p| p.size).sum::<u64>();
        if crash == CrashAt::BeforeDelete {
            return Ok(report);
        }
        let mut dirs = HashSet::new();
        for p in &ready {
            if p.kind == FileKind::File && p.size > 0 {
                let f = pending_file(&p.root, p.id);
                match fs::remove_file(&f) {
                    Ok(()) => {
                        dirs.insert(versions_dir(&p.root));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("{}: {e}", f.display()),
                }
            }
        }
        for d in dirs {
            let _ = sync_dir(&d);
        }
    }
}

/// Enough of a folder for `check_root`.
fn folder_stub(row: i64, root: &Path) -> Folder {
    Folder {
        row,
        id: crate::folder::FolderId::new("pending").expect("valid id"),
        label: String::new(),
        path: root.to_owned(),
        folder_type: crate::folder::FolderType::SendReceive,
        sequence: 0,
        error: None,
        last_scan_at: None,
        held_deletes: 0,
        epoch: 0,
    }
}

/// Reads a pending file by its version's chunks into the writer.
fn put_file(
    index: &mut Index,
    writer: &mut PackWriter,
    p: &PendingVersion,
) -> std::result::Result<(), Problem> {
    if damaged_marker(&p.root, p.id).exists() {
        return Err(Problem::Skip);
    }
    let chunks = index
        .history_chunks(p.id)
        .map_err(|e| Problem::Damaged(e.to_string()))?;
    let path = pending_file(&p.root, p.id);
    let mut each = |c: &ChunkInfo, data: &[u8]| -> std::result::Result<(), Problem> {
        match writer.put(index, &c.hash, data) {
            Ok(_) => Ok(()),
            Err(StoreError::HashMismatch { .. }) => Err(Problem::Damaged(format!(
                "the chunk at offset {} does not have its hash",
                c.offset
            ))),
            Err(e) => {
                tracing::warn!("storing version {}: {e}", p.id);
                Err(Problem::Later)
            }
        }
    };
    read_chunks(&path, p.size, &chunks, &mut each)
}

/// What [`read_chunks`] hands each chunk to.
type ChunkSink<'a> = dyn FnMut(&ChunkInfo, &[u8]) -> std::result::Result<(), Problem> + 'a;

/// Reads `path` chunk by chunk (checking the layout and length first) and
/// hands each chunk to `each`.
fn read_chunks(
    path: &Path,
    size: u64,
    chunks: &[ChunkInfo],
    each: &mut ChunkSink<'_>,
) -> std::result::Result<(), Problem> {
    check_layout(chunks, size).map_err(Problem::Damaged)?;
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::warn!(
                "{} is missing: that version's bytes are lost",
                path.display()
            );
            return Err(Problem::Skip);
        }
        Err(e) => {
            tracing::warn!("{}: {e}", path.display());
            return Err(Problem::Later);
        }
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    if len != size {
        return Err(Problem::Damaged(format!(
            "the file holds {len} bytes, the version {size}"
        )));
    }
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    for c in chunks {
        buf.resize(c.len as usize, 0);
        r.read_exact(&mut buf)
            .map_err(|e| Problem::Damaged(format!("reading it failed: {e}")))?;
        each(c, &buf)?;
    }
    Ok(())
}

/// What is wrong with a pending version's file, if anything: missing, marked
/// damaged, or not matching the version's chunks.
pub fn check_pending(index: &Index, p: &PendingVersion) -> Result<Option<String>> {
    if p.kind != FileKind::File || p.size == 0 {
        return Ok(None);
    }
    if let Ok(why) = fs::read_to_string(damaged_marker(&p.root, p.id)) {
        return Ok(Some(format!("marked damaged: {}", why.trim())));
    }
    let path = pending_file(&p.root, p.id);
    if !path.exists() {
        return Ok(Some(format!("{} is missing", path.display())));
    }
    let chunks = index.history_chunks(p.id)?;
    let mut each = |c: &ChunkInfo, data: &[u8]| -> std::result::Result<(), Problem> {
        if blake3::hash(data).as_bytes() == &c.hash.0 {
            Ok(())
        } else {
            Err(Problem::Damaged(format!(
                "the chunk at offset {} does not have its hash",
                c.offset
            )))
        }
    };
    Ok(match read_chunks(&path, p.size, &chunks, &mut each) {
        Ok(()) => None,
        Err(Problem::Damaged(why)) => Some(why),
        Err(Problem::Later | Problem::Skip) => Some(format!("{} cannot be read", path.display())),
    })
}

/// Deletes the pending files of a folder whose versions are already stored
/// (left by a crash between marking them and deleting the files), and markers
/// of versions no longer pending. Returns how many files it removed.
pub fn sweep(index: &Index, root: &Path) -> Result<u64> {
    let dir = versions_dir(root);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_at(&dir)(e)),
    };
    let mut files: Vec<(i64, PathBuf)> = Vec::new();
    let mut markers: Vec<(i64, PathBuf)> = Vec::new();
    for e in entries {
        let e = e.map_err(io_at(&dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Ok(id) = name.parse::<i64>() {
            files.push((id, e.path()));
        } else if let Some(id) = name.strip_suffix(".damaged").and_then(|n| n.parse().ok()) {
            markers.push((id, e.path()));
        }
    }
    let ids: Vec<i64> = files.iter().chain(&markers).map(|(id, _)| *id).collect();
    let stored = index.history_stored_among(&ids)?;
    let mut removed = 0;
    for (id, path) in files {
        if stored.contains(&id) {
            fs::remove_file(&path).map_err(io_at(&path))?;
            removed += 1;
        }
    }
    for (id, path) in markers {
        let pending_exists = pending_file(root, id).exists();
        if stored.contains(&id) || !pending_exists {
            let _ = fs::remove_file(&path);
        }
    }
    if removed > 0 {
        sync_dir(&dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::chunking::{DEFAULT_PARAMS, chunk_bytes};
    use crate::device::ShortId;
    use crate::folder::{self, FolderType, NewFolder};
    use crate::index::{Change, FileMeta, HistoryReason, LocalChange};
    use crate::relpath::RelPath;

    pub(crate) struct Fixture {
        pub(crate) _dir: tempfile::TempDir,
        pub(crate) index: Index,
        pub(crate) store: ChunkStore,
        pub(crate) folder: Folder,
    }

    pub(crate) fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::open(&dir.path().join("index.db"), Duration::from_secs(5)).unwrap();
        let root = dir.path().join("docs");
        fs::create_dir(&root).unwrap();
        let folder = folder::add(
            &mut index,
            NewFolder {
                path: root,
                id: None,
                label: None,
                folder_type: FolderType::SendReceive,
            },
        )
        .unwrap();
        let store = ChunkStore::open(&dir.path().join("store"), &index).unwrap();
        Fixture {
            _dir: dir,
            index,
            store,
            folder,
        }
    }

    impl Fixture {
        /// Records `data` at `path` as a local change (what a scan would).
        pub(crate) fn record(&mut self, path: &str, data: &[u8]) {
            let p = RelPath::new(path).unwrap();
            let target = p.to_fs(&self.folder.path);
            fs::write(&target, data).unwrap();
            let m = fs::symlink_metadata(&target).unwrap();
            use std::os::unix::fs::MetadataExt;
            let d = chunk_bytes(data, DEFAULT_PARAMS);
            let change = LocalChange {
                path: p,
                meta: FileMeta {
                    kind: FileKind::File,
                    size: m.len(),
                    mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                    permissions: 0o644,
                    inode: m.ino(),
                    dev: m.dev(),
                },
                change: Change::Content {
                    hash: d.hash,
                    chunks: d.chunks,
                },
            };
            self.index
                .apply_local_changes(self.folder.row, ShortId(1), &[change])
                .unwrap();
        }

        /// Sets the file at `path` aside as a pull does (a history row and
        /// the file renamed to `.ferry/versions/<id>`), then records `next`.
        pub(crate) fn replace(&mut self, path: &str, next: &[u8]) -> i64 {
            let p = RelPath::new(path).unwrap();
            let root = self.folder.path.clone();
            let tx = self.index.history_tx().unwrap();
            let kept = tx
                .supersede(self.folder.row, &p, HistoryReason::Replaced)
                .unwrap()
                .unwrap();
            fs::create_dir_all(versions_dir(&root)).unwrap();
            fs::rename(p.to_fs(&root), pending_file(&root, kept.id)).unwrap();
            tx.commit().unwrap();
            self.record(path, next);
            kept.id
        }

        pub(crate) fn pending_ids(&self) -> Vec<i64> {
            self.index
                .history_pending(1000)
                .unwrap()
                .iter()
                .map(|p| p.id)
                .collect()
        }

        pub(crate) fn restore_bytes(&self, id: i64) -> Vec<u8> {
            let v = self.index.history_version(id).unwrap().unwrap();
            let mut out = Vec::new();
            super::super::restore::copy_version(
                &self.index,
                &self.store,
                &self.folder.path,
                &v,
                &mut out,
            )
            .unwrap();
            out
        }
    }

    use crate::chunking::pseudo_random as data;

    #[test]
    fn pending_versions_move_into_the_store_and_their_files_go() {
        let mut f = fixture();
        let v1 = data(700_000, 1);
        f.record("a.bin", &v1);
        let id = f.replace("a.bin", b"second");
        let file = pending_file(&f.folder.path, id);
        assert!(file.exists());
        // Readable while pending...
        assert_eq!(f.restore_bytes(id), v1);
        let r = ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
        assert_eq!((r.versions, r.bytes), (1, 700_000));
        assert!(f.pending_ids().is_empty());
        assert!(!file.exists());
        // ... and once stored.
        assert_eq!(f.restore_bytes(id), v1);
        assert!(f.store.verify(&f.index).unwrap().is_ok());
    }

    #[test]
    fn a_damaged_pending_file_is_kept_marked_and_not_tried_again() {
        let mut f = fixture();
        f.record("a.bin", &data(300_000, 2));
        let id = f.replace("a.bin", b"x");
        let file = pending_file(&f.folder.path, id);
        let mut bytes = fs::read(&file).unwrap();
        bytes[1000] ^= 1;
        fs::write(&file, &bytes).unwrap();
        let mut skip = HashSet::new();
        let r = ingest_pending(&mut f.index, &f.store, &mut skip, &|| false).unwrap();
        assert_eq!(r.versions, 0);
        assert_eq!(r.damaged.len(), 1);
        assert_eq!(fs::read(&file).unwrap(), bytes);
        assert!(damaged_marker(&f.folder.path, id).exists());
        // Another process (a restarted agent) does not try it again either.
        let r = ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
        assert_eq!((r.versions, r.damaged.len()), (0, 0));
        let p = &f.index.history_pending(10).unwrap()[0];
        assert!(check_pending(&f.index, p).unwrap().is_some());
    }

    #[test]
    fn a_kill_before_marking_or_before_deleting_loses_nothing() {
        for crash in [CrashAt::BeforeMark, CrashAt::BeforeDelete] {
            let mut f = fixture();
            let v1 = data(500_000, 3);
            f.record("a.bin", &v1);
            let id = f.replace("a.bin", b"y");
            ingest_until(
                &mut f.index,
                &f.store,
                &mut HashSet::new(),
                &|| false,
                crash,
            )
            .unwrap();
            // A restart: the store is opened again, leftovers cleaned.
            f.store = ChunkStore::open(f.store.dir(), &f.index).unwrap();
            sweep(&f.index, &f.folder.path).unwrap();
            assert_eq!(f.restore_bytes(id), v1, "{crash:?}");
            ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
            assert!(f.pending_ids().is_empty());
            assert!(!pending_file(&f.folder.path, id).exists(), "{crash:?}");
            assert_eq!(f.restore_bytes(id), v1, "{crash:?}");
            assert!(f.store.verify(&f.index).unwrap().is_ok());
        }
    }

    mod killed_pulls {
        use std::os::unix::fs::MetadataExt;

        use super::*;
        use crate::history::verify::verify;
        use crate::index::{IndexError, Pulled, RemoteFile, Superseded};
        use crate::version_vector::VersionVector;

        /// The record a peer announces for `data` at `path` (`None`: a
        /// delete), with its chunk list.
        fn remote(path: &str, data: Option<&[u8]>) -> (RemoteFile, Vec<ChunkInfo>) {
            let d = data.map(|d| chunk_bytes(d, DEFAULT_PARAMS));
            let r = RemoteFile {
                path: RelPath::new(path).unwrap(),
                kind: FileKind::File,
                size: data.map_or(0, |d| d.len() as u64),
                mtime_ns: 5_000_000_000,
                permissions: 0o644,
                hash: d.as_ref().map(|d| d.hash),
                symlink_target: None,
                deleted: data.is_none(),
                version: VersionVector::new().with(ShortId(1), 9).with(ShortId(2), 1),
                modified_by: ShortId(2),
                sequence: 1,
                groups: Vec::new(),
            };
            (r, d.map(|d| d.chunks).unwrap_or_default())
        }

        fn pulled<'a>(r: &'a RemoteFile, chunks: &'a [ChunkInfo]) -> Pulled<'a> {
            Pulled {
                remote: r,
                version: r.version.clone(),
                meta: FileMeta {
                    kind: FileKind::File,
                    size: 0,
                    mtime_ns: r.mtime_ns,
                    permissions: r.permissions,
                    inode: 0,
                    dev: 0,
                },
                chunks,
            }
        }

        /// What `pull::place` does: the live file goes to
        /// `.ferry/versions/<id>` and `next` (if any) takes its place.
        fn place(
            root: &Path,
            path: &str,
            id: Option<i64>,
            next: Option<&[u8]>,
        ) -> io::Result<Option<FileMeta>> {
            let target = RelPath::new(path).unwrap().to_fs(root);
            fs::create_dir_all(versions_dir(root))?;
            fs::rename(&target, pending_file(root, id.expect("a version to keep")))?;
            let Some(next) = next else { return Ok(None) };
            fs::write(&target, next)?;
            let m = fs::metadata(&target)?;
            Ok(Some(FileMeta {
                kind: FileKind::File,
                size: m.len(),
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                permissions: 0o644,
                inode: m.ino(),
                dev: m.dev(),
            }))
        }

        /// A restart after a kill: the index and store opened again.
        fn restart(f: &mut Fixture) {
            let db = f._dir.path().join("index.db");
            f.index = Index::open(&db, Duration::from_secs(5)).unwrap();
            f.store = ChunkStore::open(f.store.dir(), &f.index).unwrap();
        }

        fn listed(f: &Fixture, path: &str) -> Vec<i64> {
            let p = RelPath::new(path).unwrap();
            let list = f.index.history_of(f.folder.row, Some(&p), false).unwrap();
            list.iter().map(|v| v.id).collect()
        }

        #[test]
        fn a_kill_after_the_old_version_moved_aside_keeps_it_restorable() {
            let mut f = fixture();
            let v1 = data(400_000, 21);
            f.record("a.bin", &v1);
            let (row, root) = (f.folder.row, f.folder.path.clone());
            let a = RelPath::new("a.bin").unwrap();
            let (r, chunks) = remote("a.bin", Some(b"the new version"));
            // First transaction: the row, committed before anything moves.
            let id = f
                .index
                .reserve_superseded(row, &[(&a, Superseded::Replaced)])
                .unwrap()[0]
                .unwrap();
            assert!(listed(&f, "a.bin").is_empty(), "not a version yet");
            // Second: both renames happen, then the agent dies before the
            // commit (the transaction is rolled back, as a kill leaves it).
            let killed = f.index.batch(|i| {
                i.record_pulled_reserved(row, &a, pulled(&r, &chunks), Some(id), |h| {
                    place(&root, "a.bin", h, Some(b"the new version"))?;
                    Err(io::Error::other("killed"))
                })
            });
            assert!(killed.is_err());
            restart(&mut f);
            let live = f.index.local_file(row, &a).unwrap().unwrap();
            assert_eq!(
                live.record.hash,
                Some(chunk_bytes(&v1, DEFAULT_PARAMS).hash)
            );
            assert_eq!(fs::read(pending_file(&root, id)).unwrap(), v1);
            // Nothing reported damaged while it waits; a sweep leaves its file.
            assert!(verify(&f.index, &f.store).unwrap().is_ok());
            assert_eq!(sweep(&f.index, &root).unwrap(), 0);
            // A reservation just made may be a pull in progress: left alone.
            assert_eq!(settle_reservations(&mut f.index, 0).unwrap(), (0, 0));
            assert_eq!(settle_reservations(&mut f.index, i64::MAX).unwrap(), (1, 0));
            let report =
                ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
            assert_eq!((report.versions, report.bytes), (1, 400_000));
            assert!(report.damaged.is_empty());
            assert_eq!(listed(&f, "a.bin"), [id]);
            assert!(!pending_file(&root, id).exists());
            assert_eq!(f.restore_bytes(id), v1);
            assert!(verify(&f.index, &f.store).unwrap().is_ok());
        }

        #[test]
        fn a_kill_before_anything_moved_leaves_no_version_and_the_next_pull_keeps_it() {
            let mut f = fixture();
            let v1 = data(300_000, 22);
            f.record("a.bin", &v1);
            let (row, root) = (f.folder.row, f.folder.path.clone());
            let a = RelPath::new("a.bin").unwrap();
            let id = f
                .index
                .reserve_superseded(row, &[(&a, Superseded::Replaced)])
                .unwrap()[0]
                .unwrap();
            restart(&mut f);
            assert!(listed(&f, "a.bin").is_empty());
            assert_eq!(f.index.history_totals(None).unwrap().versions, 0);
            let check = verify(&f.index, &f.store).unwrap();
            assert!(check.is_ok() && check.pending == 0, "{check:?}");
            // The ingest drops it: the version is still the live file.
            let report =
                ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
            assert_eq!(report.reservations_dropped, 0, "within the grace period");
            assert_eq!(settle_reservations(&mut f.index, i64::MAX).unwrap(), (0, 1));
            assert!(f.index.history_reserved(i64::MAX).unwrap().is_empty());
            assert!(f.index.history_chunks(id).unwrap().is_empty());
            let report =
                ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
            assert_eq!((report.versions, report.damaged.len()), (0, 0));
            assert_eq!(fs::read(a.to_fs(&root)).unwrap(), v1);
            // The pull again, to the end.
            let (r, chunks) = remote("a.bin", Some(b"the new version"));
            f.index
                .record_pulled(
                    row,
                    &a,
                    pulled(&r, &chunks),
                    Some(Superseded::Replaced),
                    |h| place(&root, "a.bin", h, Some(b"the new version")),
                )
                .unwrap();
            let kept = listed(&f, "a.bin");
            assert_eq!(kept.len(), 1);
            ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
            assert_eq!(f.restore_bytes(kept[0]), v1);
            assert!(verify(&f.index, &f.store).unwrap().is_ok());
        }

        #[test]
        fn a_pull_retried_after_a_kill_reuses_the_row_it_reserved() {
            let mut f = fixture();
            let v1 = data(200_000, 23);
            f.record("a.bin", &v1);
            let (row, root) = (f.folder.row, f.folder.path.clone());
            let a = RelPath::new("a.bin").unwrap();
            let first = f
                .index
                .reserve_superseded(row, &[(&a, Superseded::Replaced)])
                .unwrap()[0];
            restart(&mut f);
            let again = f
                .index
                .reserve_superseded(row, &[(&a, Superseded::Deleted)])
                .unwrap()[0];
            assert_eq!(again, first);
            let (r, chunks) = remote("a.bin", None);
            f.index
                .record_pulled_reserved(row, &a, pulled(&r, &chunks), again, |h| {
                    place(&root, "a.bin", h, None)
                })
                .unwrap();
            let list = f.index.history_of(row, Some(&a), false).unwrap();
            assert_eq!(
                list.iter().map(|v| v.id).collect::<Vec<_>>(),
                [first.unwrap()]
            );
            assert_eq!(list[0].reason, HistoryReason::Deleted);
            assert_eq!(settle_reservations(&mut f.index, i64::MAX).unwrap(), (0, 0));
            ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
            assert_eq!(f.restore_bytes(first.unwrap()), v1);
        }

        #[test]
        fn a_delete_retried_after_a_kill_past_the_move_keeps_the_version_once() {
            let mut f = fixture();
            let v1 = data(200_000, 24);
            f.record("a.bin", &v1);
            let (row, root) = (f.folder.row, f.folder.path.clone());
            let a = RelPath::new("a.bin").unwrap();
            let (r, chunks) = remote("a.bin", None);
            let id = f
                .index
                .reserve_superseded(row, &[(&a, Superseded::Deleted)])
                .unwrap()[0];
            let killed = f.index.batch(|i| {
                i.record_pulled_reserved(row, &a, pulled(&r, &chunks), id, |h| {
                    place(&root, "a.bin", h, None)?;
                    Err(io::Error::other("killed"))
                })
            });
            assert!(killed.is_err());
            restart(&mut f);
            assert_eq!(settle_reservations(&mut f.index, i64::MAX).unwrap(), (1, 0));
            ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
            // The delete pulled again: the path is empty already, and the
            // version kept is not kept a second time (with no bytes).
            f.index
                .record_pulled(
                    row,
                    &a,
                    pulled(&r, &chunks),
                    Some(Superseded::Deleted),
                    |h| {
                        assert_eq!(h, id);
                        Ok(None)
                    },
                )
                .unwrap();
            assert_eq!(listed(&f, "a.bin"), [id.unwrap()]);
            assert!(f.pending_ids().is_empty());
            assert_eq!(f.restore_bytes(id.unwrap()), v1);
            assert!(verify(&f.index, &f.store).unwrap().is_ok());
        }

        #[test]
        fn a_reservation_settled_between_the_transactions_moves_nothing() {
            let mut f = fixture();
            f.record("a.bin", b"old");
            let (row, root) = (f.folder.row, f.folder.path.clone());
            let a = RelPath::new("a.bin").unwrap();
            let id = f
                .index
                .reserve_superseded(row, &[(&a, Superseded::Replaced)])
                .unwrap()[0];
            assert_eq!(settle_reservations(&mut f.index, i64::MAX).unwrap(), (0, 1));
            let (r, chunks) = remote("a.bin", Some(b"new"));
            let err = f
                .index
                .record_pulled_reserved(row, &a, pulled(&r, &chunks), id, |_| {
                    panic!("nothing may move")
                })
                .unwrap_err();
            assert!(matches!(err, IndexError::ReservationGone(_)), "{err}");
            assert_eq!(fs::read(a.to_fs(&root)).unwrap(), b"old");
        }
    }

    #[test]
    fn ten_versions_of_a_large_file_edited_in_one_place_cost_little_more_than_one() {
        const LEN: usize = 50 << 20;
        let mut f = fixture();
        let mut content = data(LEN, 9);
        f.record("big.bin", &content);
        let mut ids = Vec::new();
        for i in 0..10u64 {
            let at = (i as usize * 4_999_999 + 123_457) % (LEN - 100);
            content[at..at + 100].copy_from_slice(&data(100, 100 + i));
            ids.push(f.replace("big.bin", &content));
        }
        ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
        let totals = f.store.stats(&f.index).unwrap();
        let sum = 10 * LEN as u64;
        eprintln!(
            "10 versions of a {LEN}-byte file: {} bytes in packs ({} chunks), {:.3}x one version, {:.1}% of their sum",
            totals.pack_bytes,
            totals.chunks,
            totals.pack_bytes as f64 / LEN as f64,
            100.0 * totals.pack_bytes as f64 / sum as f64
        );
        assert!(
            totals.pack_bytes < LEN as u64 * 13 / 10,
            "{} bytes stored",
            totals.pack_bytes
        );
        assert!(f.pending_ids().is_empty());
        assert_eq!(
            blake3::hash(&f.restore_bytes(ids[0])),
            blake3::hash(&data(LEN, 9))
        );
    }
}
