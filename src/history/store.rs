//! The history's chunk store: every chunk of every kept version stored once,
//! addressed by its blake3 hash, in pack files that the index locates. On a
//! device that holds encrypted backups for others it also keeps those vaults'
//! sealed chunks, addressed by the hash of the sealed bytes
//! ([`ChunkStore::write_pack`]).
//!
//! Under the store directory (`<home>/store`):
//! - `packs/<first 2 hex>/<32 hex>.pack`: complete, fsynced packs;
//! - `tmp/`: packs being written (whatever is left there is removed at open);
//! - `lock`: held shared by writers and readers, exclusively by GC and orphan
//!   cleanup, across processes (`flock`).
//!
//! A pack is [`PACK_MAGIC`] and a format version byte ([`PACK_VERSION`]), then
//! entries `[blake3 hash: 32 bytes][data length: u32 BE][data]`, and nothing
//! else: a pack can be walked without the index ([`read_pack_entries`]).
//!
//! Crash safety rests on one order. A pack is fsynced, renamed into place and its
//! directory fsynced before the rows pointing into it are committed; a pack file
//! is deleted only after the commit that leaves no row pointing into it is
//! durable. A crash in between leaves a pack no row points to, which
//! [`ChunkStore::cleanup_orphans`] (run by [`ChunkStore::open`]) removes; so every
//! row always points to a complete pack holding its chunk.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunking::ChunkHash;
use crate::index::{ChunkLocation, Index, IndexError, PackRow, StoreTotals, StoredChunk};

/// The first bytes of every pack.
pub const PACK_MAGIC: [u8; 8] = *b"FERRYPK1";
/// The pack format version, the byte after [`PACK_MAGIC`].
pub const PACK_VERSION: u8 = 1;
/// Bytes before the first entry: magic and version.
pub const PACK_HEADER_LEN: u64 = 9;
/// Bytes of an entry before its data: hash and length.
pub const ENTRY_HEADER_LEN: u64 = 36;
/// A pack is sealed once it reaches this size (so it holds up to one chunk more).
pub const PACK_TARGET_SIZE: u64 = 16 << 20;
/// The largest chunk the store takes (the chunker's maximum is 256 KiB).
pub const MAX_CHUNK_SIZE: usize = 1 << 20;
/// GC rewrites a pack whose live entries take less than this percentage of it.
pub const REWRITE_BELOW_PERCENT: u64 = 50;

/// What is wrong with a stored chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The pack file is gone.
    MissingPack,
    /// The pack does not start with a ferry pack header of a known version.
    BadHeader,
    /// The pack ends before the chunk does.
    Truncated,
    /// The entry at the recorded offset is for another chunk or length.
    WrongEntry,
    /// The data read does not have the chunk's hash.
    HashMismatch,
    /// Reading the pack failed.
    Unreadable(String),
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::MissingPack => f.write_str("the pack file is missing"),
            Damage::BadHeader => f.write_str("the pack header is not a ferry pack's"),
            Damage::Truncated => f.write_str("the pack is truncated"),
            Damage::WrongEntry => f.write_str("the pack holds another entry at its offset"),
            Damage::HashMismatch => f.write_str("its bytes do not match its hash"),
            Damage::Unreadable(e) => write!(f, "the pack cannot be read: {e}"),
        }
    }
}

/// Why the chunk store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A chunk over [`MAX_CHUNK_SIZE`].
    #[error("a chunk of {len} bytes is over the {MAX_CHUNK_SIZE}-byte limit")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// The bytes given for a chunk do not have its hash.
    #[error("the bytes given for chunk {hash} do not have that hash")]
    HashMismatch {
        /// The hash they were given for.
        hash: ChunkHash,
    },
    /// The store does not hold the chunk.
    #[error("chunk {0} is not in the history store")]
    NotFound(ChunkHash),
    /// The chunk's pack is damaged.
    #[error("damaged pack {pack} in the history store: chunk {hash}: {damage}")]
    Damaged {
        /// The pack's name.
        pack: String,
        /// The chunk read.
        hash: ChunkHash,
        /// What is wrong.
        damage: Damage,
    },
    /// Writers or readers are active, so GC or cleanup cannot run now.
    #[error(
        "the history store is in use (a restore or backup is running); try again when it is done"
    )]
    Busy,
    /// The index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Where.
        path: PathBuf,
        /// What happened.
        source: io::Error,
    },
}

/// Result alias for store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A chunk the store could not read back intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedChunk {
    /// The chunk.
    pub hash: ChunkHash,
    /// The pack its row points to.
    pub pack: String,
    /// What is wrong.
    pub damage: Damage,
}

/// What [`ChunkStore::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Packs checked.
    pub packs: u64,
    /// Chunks checked.
    pub chunks: u64,
    /// Data bytes read back intact.
    pub bytes: u64,
    /// Chunks that could not be read back intact.
    pub damaged: Vec<DamagedChunk>,
    /// Chunks the history refers to that the store does not hold.
    pub unstored: Vec<ChunkHash>,
}

impl VerifyReport {
    /// Whether everything checked out.
    pub fn is_ok(&self) -> bool {
        self.damaged.is_empty() && self.unstored.is_empty()
    }
}

/// What [`ChunkStore::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Unreferenced chunks dropped.
    pub chunks_removed: u64,
    /// Their data bytes.
    pub chunk_bytes_removed: u64,
    /// Packs deleted because nothing in them was live.
    pub packs_deleted: u64,
    /// Sparse packs whose live chunks were copied to new packs and then deleted.
    pub packs_rewritten: u64,
    /// New packs written for those copies.
    pub packs_written: u64,
    /// Disk space given back, in bytes.
    pub bytes_freed: u64,
    /// Live chunks found damaged while copying (left where they were).
    pub damaged: Vec<DamagedChunk>,
}

/// What [`ChunkStore::cleanup_orphans`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Packs no row pointed to.
    pub packs: u64,
    /// Leftover temp files.
    pub temp_files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// What a [`PackWriter`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Chunks appended to packs.
    pub chunks_written: u64,
    /// Their data bytes.
    pub bytes_written: u64,
    /// Chunks skipped because the store already held them.
    pub chunks_deduplicated: u64,
    /// Packs sealed and committed.
    pub packs_written: u64,
}

/// What a walk of a pack file found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackListing {
    /// The intact entries, by offset.
    pub entries: Vec<StoredChunk>,
    /// Damage found, with the offset of the entry (0 for the header).
    pub damage: Vec<(u64, Damage)>,
}

/// The chunk store in a directory; the index says where each chunk is.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
    pack_target: u64,
}

/// Where a pack of this name lives, if the name is one ferry writes.
fn pack_path(dir: &Path, name: &str) -> Result<PathBuf> {
    if !is_pack_name(name) {
        return Err(IndexError::Corrupt(format!("pack name {name:?}")).into());
    }
    Ok(dir
        .join("packs")
        .join(&name[..2])
        .join(format!("{name}.pack")))
}

fn is_pack_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn random_name() -> Result<String> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| StoreError::Io {
        path: PathBuf::from("(random source)"),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(data_encoding::HEXLOWER.encode(&id))
}

fn sync_dir(dir: &Path) -> Result<()> {
    crate::disk::sync_dir(dir).map_err(io_at(dir))
}

/// Takes the store lock: shared (waiting for GC to finish) or exclusive
/// (failing with [`StoreError::Busy`] while anyone else holds it).
fn lock(dir: &Path, exclusive: bool) -> Result<File> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_at(&path))?;
    if exclusive {
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Busy),
            Err(fs::TryLockError::Error(e)) => return Err(io_at(&path)(e)),
        }
    } else {
        file.lock_shared().map_err(io_at(&path))?;
    }
    Ok(file)
}

/// Opens a pack and checks its header.
fn open_pack(path: &Path) -> io::Result<Result<File, Damage>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err(Damage::MissingPack)),
        Err(e) => return Err(e),
    };
    let mut header = [0u8; PACK_HEADER_LEN as usize];
    match file.read_exact_at(&mut header, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Err(Damage::BadHeader)),
        Err(e) => return Err(e),
    }
    if header[..8] != PACK_MAGIC || header[8] != PACK_VERSION {
        return Ok(Err(Damage::BadHeader));
    }
    Ok(Ok(file))
}

/// Reads the entry at `offset` and checks it is `hash`'s, intact.
fn read_entry(
    file: &File,
    offset: u64,
    length: u32,
    hash: &ChunkHash,
) -> io::Result<Result<Vec<u8>, Damage>> {
    if length as usize > MAX_CHUNK_SIZE || offset < PACK_HEADER_LEN {
        return Ok(Err(Damage::WrongEntry));
    }
    let mut buf = vec![0u8; ENTRY_HEADER_LEN as usize + length as usize];
    match file.read_exact_at(&mut buf, offset) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Err(Damage::Truncated)),
        Err(e) => return Err(e),
    }
    let (head, data) = buf.split_at(ENTRY_HEADER_LEN as usize);
    if head[..32] != hash.0 || head[32..] != length.to_be_bytes() {
        return Ok(Err(Damage::WrongEntry));
    }
    if ChunkHash::from(blake3::hash(data)) != *hash {
        return Ok(Err(Damage::HashMismatch));
    }
    buf.drain(..ENTRY_HEADER_LEN as usize);
    Ok(Ok(buf))
}

/// Walks a pack file entry by entry, checking each hash, without the index: what
/// an index rebuild or a deep check reads.
pub fn read_pack_entries(path: &Path) -> Result<PackListing> {
    let mut listing = PackListing::default();
    let file = match open_pack(path).map_err(io_at(path))? {
        Ok(f) => f,
        Err(damage) => {
            listing.damage.push((0, damage));
            return Ok(listing);
        }
    };
    let mut r = BufReader::with_capacity(1 << 20, file);
    // open_pack checked the header; step over it.
    crate::disk::read_full(&mut r, &mut [0u8; PACK_HEADER_LEN as usize]).map_err(io_at(path))?;
    let mut offset = PACK_HEADER_LEN;
    let mut data = Vec::new();
    loop {
        let mut head = [0u8; ENTRY_HEADER_LEN as usize];
        let got = crate::disk::read_full(&mut r, &mut head).map_err(io_at(path))?;
        if got == 0 {
            break;
        }
        if got < head.len() {
            listing.damage.push((offset, Damage::Truncated));
            break;
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&head[..32]);
        let hash = ChunkHash(hash);
        let length = u32::from_be_bytes([head[32], head[33], head[34], head[35]]);
        if length as usize > MAX_CHUNK_SIZE {
            // Without a believable length the rest cannot be framed.
            listing.damage.push((offset, Damage::WrongEntry));
            break;
        }
        data.resize(length as usize, 0);
        if crate::disk::read_full(&mut r, &mut data).map_err(io_at(path))? < data.len() {
            listing.damage.push((offset, Damage::Truncated));
            break;
        }
        if ChunkHash::from(blake3::hash(&data)) == hash {
            listing.entries.push(StoredChunk {
                hash,
                offset,
                length,
            });
        } else {
            listing.damage.push((offset, Damage::HashMismatch));
        }
        offset += ENTRY_HEADER_LEN + length as u64;
    }
    Ok(listing)
}

/// A pack being written in `tmp/`.
struct OpenPack {
    name: String,
    tmp: PathBuf,
    file: BufWriter<File>,
    size: u64,
    entries: Vec<StoredChunk>,
    hashes: HashSet<ChunkHash>,
}

/// A pack that [`ChunkStore::write_pack`] wrote: complete and in place, its
/// rows not committed yet; the store lock is held (shared) while this lives.
pub struct NewPack {
    /// The pack's name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its entries, in the order the chunks were given.
    pub entries: Vec<StoredChunk>,
    _lock: File,
}

/// A pack complete and in place, whose rows are not committed yet.
struct SealedPack {
    name: String,
    size: u64,
    entries: Vec<StoredChunk>,
}

impl OpenPack {
    fn create(dir: &Path) -> Result<Self> {
        let name = random_name()?;
        let tmp = dir.join("tmp").join(format!("{name}.pack"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        let mut pack = Self {
            name,
            file: BufWriter::with_capacity(1 << 20, file),
            tmp,
            size: 0,
            entries: Vec::new(),
            hashes: HashSet::new(),
        };
        let written = pack
            .file
            .write_all(&PACK_MAGIC)
            .and_then(|()| pack.file.write_all(&[PACK_VERSION]));
        if let Err(e) = written {
            let err = io_at(&pack.tmp)(e);
            pack.discard();
            return Err(err);
        }
        pack.size = PACK_HEADER_LEN;
        Ok(pack)
    }

    fn append(&mut self, hash: &ChunkHash, data: &[u8]) -> io::Result<()> {
        let length = data.len() as u32;
        self.file.write_all(&hash.0)?;
        self.file.write_all(&length.to_be_bytes())?;
        self.file.write_all(data)?;
        self.entries.push(StoredChunk {
            hash: *hash,
            offset: self.size,
            length,
        });
        self.hashes.insert(*hash);
        self.size += ENTRY_HEADER_LEN + data.len() as u64;
        Ok(())
    }

    /// Flushes and fsyncs the pack, renames it into `packs/`, and fsyncs the
    /// directories it appears in. On failure the temp file is removed.
    fn seal(self, dir: &Path) -> Result<SealedPack> {
        let tmp = self.tmp.clone();
        let result = self.seal_inner(dir);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn seal_inner(self, dir: &Path) -> Result<SealedPack> {
        let tmp = self.tmp;
        let file = self
            .file
            .into_inner()
            .map_err(|e| io_at(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io_at(&tmp))?;
        drop(file);
        let path = pack_path(dir, &self.name)?;
        let parent = path.parent().unwrap_or(dir);
        match fs::create_dir(parent) {
            Ok(()) => sync_dir(&dir.join("packs"))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_at(parent)(e)),
        }
        fs::rename(&tmp, &path).map_err(io_at(&path))?;
        sync_dir(parent)?;
        Ok(SealedPack {
            name: self.name,
            size: self.size,
            entries: self.entries,
        })
    }

    fn discard(self) {
        drop(self.file);
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Test seams: where [`ChunkStore::gc`] stops as if the process were killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum CrashAt {
    Never,
    /// Unreferenced rows dropped, emptied packs not deleted yet.
    BeforeEmptyPackDelete,
    /// A rewritten pack sealed in place, its rows not committed.
    BeforeRewriteCommit,
    /// Chunks repointed to the rewritten pack, the old packs not deleted yet.
    BeforeOldPackDelete,
}

impl ChunkStore {
    /// Opens (creating if needed) the store in `dir`, removing orphan packs and
    /// temp files left by a crash unless another process is using the store.
    pub fn open(dir: &Path, index: &Index) -> Result<Self> {
        for d in [dir.to_owned(), dir.join("packs"), dir.join("tmp")] {
            fs::create_dir_all(&d).map_err(io_at(&d))?;
        }
        let store = Self {
            dir: dir.to_owned(),
            pack_target: PACK_TARGET_SIZE,
        };
        match store.cleanup_orphans(index) {
            Ok(c) if c != Cleanup::default() => {
                tracing::info!(
                    packs = c.packs,
                    temp_files = c.temp_files,
                    bytes = c.bytes,
                    "removed what an interrupted history write left behind"
                );
            }
            Ok(_) | Err(StoreError::Busy) => {}
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    /// A handle on the store in `dir` that someone else opened (the agent),
    /// for reading: no crash cleanup, nothing created.
    pub fn attach(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            pack_target: PACK_TARGET_SIZE,
        }
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts writing chunks. The writer holds the store lock shared until it is
    /// dropped, so GC cannot drop a chunk it deduplicated against: keep it until
    /// the history rows that refer to its chunks are committed.
    pub fn writer(&self) -> Result<PackWriter> {
        Ok(PackWriter {
            dir: self.dir.clone(),
            pack_target: self.pack_target,
            _lock: lock(&self.dir, false)?,
            open: None,
            stats: WriteStats::default(),
        })
    }

    /// Writes `chunks` as one new pack, each keyed by the blake3 hash of its
    /// bytes (computed here), for bytes the index refers to from elsewhere than
    /// the history: a vault's sealed chunks on a holder. Nothing is deduplicated.
    /// The pack is complete, fsynced and in place when this returns; commit its
    /// rows (see [`Index::vault_add_pack`]) in the transaction that makes them
    /// referenced, before dropping the result, which holds the store lock shared
    /// so that GC cannot run in between. Should the commit not happen, the pack
    /// is an orphan that the next [`ChunkStore::open`] removes.
    pub fn write_pack(&self, chunks: &[&[u8]]) -> Result<NewPack> {
        if let Some(c) = chunks.iter().find(|c| c.len() > MAX_CHUNK_SIZE) {
            return Err(StoreError::TooLarge { len: c.len() });
        }
        let lock = lock(&self.dir, false)?;
        let mut pack = OpenPack::create(&self.dir)?;
        for data in chunks {
            let hash = ChunkHash::from(blake3::hash(data));
            if let Err(e) = pack.append(&hash, data) {
                let tmp = pack.tmp.clone();
                pack.discard();
                return Err(io_at(&tmp)(e));
            }
        }
        let sealed = pack.seal(&self.dir)?;
        Ok(NewPack {
            name: sealed.name,
            size: sealed.size,
            entries: sealed.entries,
            _lock: lock,
        })
    }

    /// A reader for many chunks (restoring a file), keeping the current pack open
    /// between reads. It holds the store lock shared until dropped.
    pub fn reader(&self) -> Result<ChunkReader> {
        Ok(ChunkReader {
            dir: self.dir.clone(),
            _lock: lock(&self.dir, false)?,
            pack: None,
        })
    }

    /// Reads one chunk, checking its hash.
    pub fn read_chunk(&self, index: &Index, hash: &ChunkHash) -> Result<Vec<u8>> {
        self.reader()?.read(index, hash)
    }

    /// Totals: packs, chunks, stored bytes.
    pub fn stats(&self, index: &Index) -> Result<StoreTotals> {
        Ok(index.store_totals()?)
    }

    /// Removes pack files no row points to (left by a crash between writing a
    /// pack and committing it, or during GC) and leftover temp files. Fails with
    /// [`StoreError::Busy`] while a writer, reader or GC is active.
    pub fn cleanup_orphans(&self, index: &Index) -> Result<Cleanup> {
        let _lock = lock(&self.dir, true)?;
        let mut done = Cleanup::default();
        let tmp = self.dir.join("tmp");
        for (path, len) in files_in(&tmp)? {
            fs::remove_file(&path).map_err(io_at(&path))?;
            done.temp_files += 1;
            done.bytes += len;
        }
        if done.temp_files > 0 {
            sync_dir(&tmp)?;
        }
        let known = index.store_pack_names()?;
        let packs = self.dir.join("packs");
        for sub in subdirs(&packs)? {
            let mut removed = false;
            for (path, len) in files_in(&sub)? {
                let orphan = path.extension().is_some_and(|e| e == "pack")
                    && path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .is_some_and(|s| is_pack_name(s) && !known.contains(s));
                if orphan {
                    fs::remove_file(&path).map_err(io_at(&path))?;
                    done.packs += 1;
                    done.bytes += len;
                    removed = true;
                }
            }
            if removed {
                sync_dir(&sub)?;
            }
        }
        Ok(done)
    }

    /// Drops the chunks no version in the history refers to (`history_chunks`),
    /// deletes packs left with no live chunk, and rewrites packs whose live
    /// entries take under [`REWRITE_BELOW_PERCENT`] of them: their live chunks
    /// are copied to new packs, which are committed before the old ones are
    /// deleted. Fails with [`StoreError::Busy`] while a writer or reader is
    /// active. A damaged live chunk stays where it is and is reported.
    pub fn gc(&self, index: &mut Index) -> Result<GcStats> {
        self.gc_until(index, CrashAt::Never)
    }

    fn gc_until(&self, index: &mut Index, crash: CrashAt) -> Result<GcStats> {
        let _lock = lock(&self.dir, true)?;
        let mut stats = GcStats::default();
        let dropped = index.store_drop_unreferenced()?;
        stats.chunks_removed = dropped.chunks;
        stats.chunk_bytes_removed = dropped.bytes;
        if crash == CrashAt::BeforeEmptyPackDelete {
            return Ok(stats);
        }
        self.delete_packs(&dropped.empty_packs)?;
        stats.packs_deleted = dropped.empty_packs.len() as u64;
        stats.bytes_freed = dropped.empty_packs.iter().map(|p| p.size).sum();

        let sparse = index.store_pack_usage()?.into_iter().filter(|u| {
            let live = u.live_bytes + u.live_chunks * ENTRY_HEADER_LEN;
            let payload = u.pack.size.saturating_sub(PACK_HEADER_LEN);
            u.live_chunks > 0 && live * 100 < REWRITE_BELOW_PERCENT * payload
        });
        let mut rewrite = Rewrite::default();
        for usage in sparse {
            let path = pack_path(&self.dir, &usage.pack.name)?;
            let chunks = index.store_pack_chunks(usage.pack.id)?;
            let name = usage.pack.name.clone();
            let file = match open_pack(&path) {
                Ok(Ok(f)) => f,
                Ok(Err(d)) => {
                    let all = chunks.iter().map(|c| damaged(&name, c.hash, d.clone()));
                    stats.damaged.extend(all);
                    continue;
                }
                Err(e) => {
                    let d = Damage::Unreadable(e.to_string());
                    let all = chunks.iter().map(|c| damaged(&name, c.hash, d.clone()));
                    stats.damaged.extend(all);
                    continue;
                }
            };
            let mut intact = true;
            for c in &chunks {
                let data = match read_entry(&file, c.offset, c.length, &c.hash) {
                    Ok(Ok(data)) => data,
                    Ok(Err(d)) => {
                        stats.damaged.push(damaged(&name, c.hash, d));
                        intact = false;
                        continue;
                    }
                    Err(e) => {
                        let d = Damage::Unreadable(e.to_string());
                        stats.damaged.push(damaged(&name, c.hash, d));
                        intact = false;
                        continue;
                    }
                };
                let out = match &mut rewrite.out {
                    Some(out) => out,
                    None => rewrite.out.insert(OpenPack::create(&self.dir)?),
                };
                out.append(&c.hash, &data).map_err(io_at(&out.tmp))?;
            }
            // A pack with a damaged chunk keeps that chunk's row, so it stays.
            if intact {
                rewrite.drained.push(usage.pack);
            }
            if rewrite
                .out
                .as_ref()
                .is_some_and(|o| o.size >= self.pack_target)
                && !self.commit_rewrite(index, &mut rewrite, &mut stats, crash)?
            {
                return Ok(stats);
            }
        }
        self.commit_rewrite(index, &mut rewrite, &mut stats, crash)?;
        Ok(stats)
    }

    /// Seals the pack a GC rewrite is filling, commits the moves into it, then
    /// deletes the packs it drained. Returns false where a crash is simulated.
    fn commit_rewrite(
        &self,
        index: &mut Index,
        rewrite: &mut Rewrite,
        stats: &mut GcStats,
        crash: CrashAt,
    ) -> Result<bool> {
        let Some(out) = rewrite.out.take() else {
            return Ok(true);
        };
        let sealed = out.seal(&self.dir)?;
        if crash == CrashAt::BeforeRewriteCommit {
            return Ok(false);
        }
        let drained: Vec<PackRow> = std::mem::take(&mut rewrite.drained);
        let ids: Vec<i64> = drained.iter().map(|p| p.id).collect();
        index.store_move_chunks(&sealed.name, sealed.size, &sealed.entries, &ids)?;
        stats.packs_written += 1;
        stats.packs_rewritten += drained.len() as u64;
        let old: u64 = drained.iter().map(|p| p.size).sum();
        stats.bytes_freed += old.saturating_sub(sealed.size);
        if crash == CrashAt::BeforeOldPackDelete {
            return Ok(false);
        }
        self.delete_packs(&drained)?;
        Ok(true)
    }

    /// Deletes pack files whose rows are gone, and makes the deletes durable.
    fn delete_packs(&self, packs: &[PackRow]) -> Result<()> {
        let mut dirs = HashSet::new();
        for p in packs {
            let path = pack_path(&self.dir, &p.name)?;
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e)),
            }
            if let Some(parent) = path.parent() {
                dirs.insert(parent.to_owned());
            }
        }
        for d in dirs {
            sync_dir(&d)?;
        }
        Ok(())
    }

    /// Reads back every chunk the index places in the store and checks its hash;
    /// also lists chunks the history refers to that the store lacks.
    pub fn verify(&self, index: &Index) -> Result<VerifyReport> {
        let _lock = lock(&self.dir, false)?;
        let mut report = VerifyReport::default();
        for pack in index.store_packs()? {
            report.packs += 1;
            let chunks = index.store_pack_chunks(pack.id)?;
            report.chunks += chunks.len() as u64;
            let name = &pack.name;
            let file = match open_pack(&pack_path(&self.dir, name)?) {
                Ok(Ok(f)) => f,
                Ok(Err(d)) => {
                    let all = chunks.iter().map(|c| damaged(name, c.hash, d.clone()));
                    report.damaged.extend(all);
                    continue;
                }
                Err(e) => {
                    let d = Damage::Unreadable(e.to_string());
                    let all = chunks.iter().map(|c| damaged(name, c.hash, d.clone()));
                    report.damaged.extend(all);
                    continue;
                }
            };
            for c in &chunks {
                match read_entry(&file, c.offset, c.length, &c.hash) {
                    Ok(Ok(_)) => report.bytes += c.length as u64,
                    Ok(Err(d)) => report.damaged.push(damaged(name, c.hash, d)),
                    Err(e) => {
                        let d = Damage::Unreadable(e.to_string());
                        report.damaged.push(damaged(name, c.hash, d));
                    }
                }
            }
        }
        report.unstored = index.store_unstored_history_chunks()?;
        Ok(report)
    }

    /// The same store with a smaller pack size, so tests see many packs.
    #[cfg(test)]
    fn with_pack_target(mut self, bytes: u64) -> Self {
        self.pack_target = bytes;
        self
    }
}

fn damaged(pack: &str, hash: ChunkHash, damage: Damage) -> DamagedChunk {
    DamagedChunk {
        hash,
        pack: pack.to_owned(),
        damage,
    }
}

/// The pack a GC fills with live chunks, and the packs fully copied into it.
#[derive(Default)]
struct Rewrite {
    out: Option<OpenPack>,
    drained: Vec<PackRow>,
}

impl Drop for Rewrite {
    fn drop(&mut self) {
        // A GC that fails midway leaves no temp file behind.
        if let Some(out) = self.out.take() {
            out.discard();
        }
    }
}

/// Regular files directly in `dir` with their sizes (none if it is missing).
fn files_in(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    for entry in read_dir(dir)? {
        let entry = entry.map_err(io_at(dir))?;
        let meta = entry.metadata().map_err(io_at(&entry.path()))?;
        if meta.is_file() {
            out.push((entry.path(), meta.len()));
        }
    }
    Ok(out)
}

/// The two-hex-character subdirectories of `packs/`.
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in read_dir(dir)? {
        let entry = entry.map_err(io_at(dir))?;
        let name = entry.file_name();
        let named_right = name.to_str().is_some_and(|n| {
            n.len() == 2 && n.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if named_right && entry.file_type().map_err(io_at(&entry.path()))?.is_dir() {
            out.push(entry.path());
        }
    }
    Ok(out)
}

fn read_dir(dir: &Path) -> Result<Vec<io::Result<fs::DirEntry>>> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(rd.collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_at(dir)(e)),
    }
}

/// Appends new chunks to packs, deduplicated against the whole store; see
/// [`ChunkStore::writer`]. A chunk is stored once [`PackWriter::flush`] or
/// [`PackWriter::finish`] returns; dropping the writer discards the pack being
/// written.
pub struct PackWriter {
    dir: PathBuf,
    pack_target: u64,
    _lock: File,
    open: Option<OpenPack>,
    stats: WriteStats,
}

impl PackWriter {
    /// Adds a chunk unless the store already holds it (returns whether it was
    /// new). Refuses chunks over [`MAX_CHUNK_SIZE`] and bytes that do not have
    /// `hash`. Seals and commits the pack when it reaches its target size.
    pub fn put(&mut self, index: &mut Index, hash: &ChunkHash, data: &[u8]) -> Result<bool> {
        if data.len() > MAX_CHUNK_SIZE {
            return Err(StoreError::TooLarge { len: data.len() });
        }
        if ChunkHash::from(blake3::hash(data)) != *hash {
            return Err(StoreError::HashMismatch { hash: *hash });
        }
        let pending = self.open.as_ref().is_some_and(|p| p.hashes.contains(hash));
        if pending || index.store_contains(hash)? {
            self.stats.chunks_deduplicated += 1;
            return Ok(false);
        }
        let pack = match &mut self.open {
            Some(p) => p,
            None => self.open.insert(OpenPack::create(&self.dir)?),
        };
        if let Err(e) = pack.append(hash, data) {
            let tmp = pack.tmp.clone();
            if let Some(p) = self.open.take() {
                p.discard();
            }
            return Err(io_at(&tmp)(e));
        }
        self.stats.chunks_written += 1;
        self.stats.bytes_written += data.len() as u64;
        if pack.size >= self.pack_target {
            self.flush(index)?;
        }
        Ok(true)
    }

    /// Seals the pack being written (fsync, rename into place, fsync of its
    /// directory) and then commits its chunks' rows in one transaction.
    pub fn flush(&mut self, index: &mut Index) -> Result<()> {
        if let Some(sealed) = self.seal()? {
            // If the commit fails the pack is an orphan, removed at next open.
            index.store_add_pack(&sealed.name, sealed.size, &sealed.entries)?;
            self.stats.packs_written += 1;
        }
        Ok(())
    }

    /// Flushes and releases the store lock.
    pub fn finish(mut self, index: &mut Index) -> Result<WriteStats> {
        self.flush(index)?;
        Ok(self.stats)
    }

    /// What the writer did so far.
    pub fn stats(&self) -> WriteStats {
        self.stats
    }

    fn seal(&mut self) -> Result<Option<SealedPack>> {
        self.open.take().map(|p| p.seal(&self.dir)).transpose()
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if let Some(p) = self.open.take() {
            p.discard();
        }
    }
}

/// Reads chunks, keeping the last pack open; see [`ChunkStore::reader`].
pub struct ChunkReader {
    dir: PathBuf,
    _lock: File,
    pack: Option<(String, File)>,
}

impl ChunkReader {
    /// Reads a chunk, checking its hash.
    pub fn read(&mut self, index: &Index, hash: &ChunkHash) -> Result<Vec<u8>> {
        let loc = index
            .store_locate(hash)?
            .ok_or(StoreError::NotFound(*hash))?;
        self.read_at(hash, &loc)
    }

    /// Reads a chunk at a location looked up earlier ([`Index::store_locate`]),
    /// checking its hash; for reading many chunks with the index locked once.
    pub fn read_at(&mut self, hash: &ChunkHash, loc: &ChunkLocation) -> Result<Vec<u8>> {
        let damaged = |damage| StoreError::Damaged {
            pack: loc.pack_name.clone(),
            hash: *hash,
            damage,
        };
        let path = pack_path(&self.dir, &loc.pack_name)?;
        let file = match self.pack.take() {
            Some((name, file)) if name == loc.pack_name => file,
            _ => open_pack(&path).map_err(io_at(&path))?.map_err(damaged)?,
        };
        let data = read_entry(&file, loc.offset, loc.length, hash);
        self.pack = Some((loc.pack_name.clone(), file));
        data.map_err(io_at(&path))?.map_err(damaged)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::time::Duration;

    use proptest::prelude::*;
    use rusqlite::params;

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        index: Index,
        store: ChunkStore,
    }

    fn fixture(pack_target: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.db"), Duration::from_secs(5)).unwrap();
        let store = ChunkStore::open(&dir.path().join("store"), &index)
            .unwrap()
            .with_pack_target(pack_target);
        Fixture {
            _dir: dir,
            index,
            store,
        }
    }

    impl Fixture {
        fn reopen(&mut self) {
            let target = self.store.pack_target;
            self.store = ChunkStore::open(self.store.dir(), &self.index)
                .unwrap()
                .with_pack_target(target);
        }

        fn put(&mut self, chunks: &[(ChunkHash, Vec<u8>)]) -> WriteStats {
            let mut w = self.store.writer().unwrap();
            for (h, d) in chunks {
                w.put(&mut self.index, h, d).unwrap();
            }
            w.finish(&mut self.index).unwrap()
        }

        fn read(&self, hash: &ChunkHash) -> Result<Vec<u8>> {
            self.store.read_chunk(&self.index, hash)
        }

        /// Pack files on disk, by name.
        fn pack_files(&self) -> BTreeSet<String> {
            let mut out = BTreeSet::new();
            for sub in subdirs(&self.store.dir().join("packs")).unwrap() {
                for (path, _) in files_in(&sub).unwrap() {
                    let stem = path.file_stem().unwrap().to_str().unwrap();
                    out.insert(stem.to_owned());
                }
            }
            out
        }

        fn indexed_packs(&self) -> BTreeSet<String> {
            self.index.store_pack_names().unwrap().into_iter().collect()
        }

        fn pack_path_of(&self, hash: &ChunkHash) -> (ChunkLocation, PathBuf) {
            let loc = self.index.store_locate(hash).unwrap().unwrap();
            let path = pack_path(self.store.dir(), &loc.pack_name).unwrap();
            (loc, path)
        }
    }

    /// Makes the history refer to `hashes` (one new version holding them).
    fn reference(index: &Index, hashes: &[ChunkHash]) {
        let conn = index.conn_for_tests();
        conn.execute(
            "INSERT OR IGNORE INTO folders (id, folder_id, label, path, folder_type, created_at)
             VALUES (1, 't', 't', '/t', 'send-receive', 0)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO history (folder, path, kind, size, mtime_ns, permissions, version,
                                  modified_by, superseded_at, reason)
             VALUES (1, 'f', 0, 0, 0, 420, X'', 1, 0, 'replaced')",
            [],
        )
        .unwrap();
        let version = conn.last_insert_rowid();
        for (i, h) in hashes.iter().enumerate() {
            conn.execute(
                "INSERT INTO history_chunks (version, idx, offset, size, hash)
                 VALUES (?1, ?2, 0, 0, ?3)",
                params![version, i as i64, &h.0[..]],
            )
            .unwrap();
        }
    }

    fn unreference(index: &Index, hashes: &[ChunkHash]) {
        for h in hashes {
            index
                .conn_for_tests()
                .execute("DELETE FROM history_chunks WHERE hash = ?1", [&h.0[..]])
                .unwrap();
        }
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        // Seeds here are small counters: spread them so nearby ones differ.
        crate::chunking::pseudo_random(len, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn chunk(seed: u64, len: usize) -> (ChunkHash, Vec<u8>) {
        let data = pseudo_random(len, seed);
        (blake3::hash(&data).into(), data)
    }

    fn hashes(chunks: &[(ChunkHash, Vec<u8>)]) -> Vec<ChunkHash> {
        chunks.iter().map(|c| c.0).collect()
    }

    fn flip_byte(path: &Path, at: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x55], at).unwrap();
    }

    #[test]
    fn a_chunk_put_twice_is_stored_once_and_reads_back_exactly() {
        let mut f = fixture(PACK_TARGET_SIZE);
        let (h, d) = chunk(1, 5000);
        let stats = f.put(&[(h, d.clone()), (h, d.clone())]);
        assert_eq!((stats.chunks_written, stats.chunks_deduplicated), (1, 1));
        let stats = f.put(&[(h, d.clone())]);
        assert_eq!((stats.chunks_written, stats.chunks_deduplicated), (0, 1));
        assert_eq!(stats.packs_written, 0);
        let totals = f.store.stats(&f.index).unwrap();
        assert_eq!((totals.packs, totals.chunks), (1, 1));
        assert_eq!(totals.chunk_bytes, 5000);
        assert_eq!(totals.pack_bytes, PACK_HEADER_LEN + ENTRY_HEADER_LEN + 5000);
        assert_eq!(f.read(&h).unwrap(), d);
        let (other, _) = chunk(2, 10);
        assert!(matches!(f.read(&other), Err(StoreError::NotFound(x)) if x == other));
    }

    #[test]
    fn ten_versions_differing_in_one_chunk_cost_one_chunk_more_each() {
        const LEN: usize = 64 << 10;
        let mut f = fixture(PACK_TARGET_SIZE);
        let mut file: Vec<(ChunkHash, Vec<u8>)> = (0..16).map(|i| chunk(i, LEN)).collect();
        let mut versions = Vec::new();
        for v in 0..10u64 {
            if v > 0 {
                file[v as usize] = chunk(1000 + v, LEN);
            }
            f.put(&file);
            versions.push(file.clone());
        }
        let totals = f.store.stats(&f.index).unwrap();
        assert_eq!(totals.chunks, 16 + 9);
        assert_eq!(totals.chunk_bytes, (16 + 9) * LEN as u64);
        let mut reader = f.store.reader().unwrap();
        for version in &versions {
            let mut whole = Vec::new();
            for (h, _) in version {
                whole.extend(reader.read(&f.index, h).unwrap());
            }
            let expected: Vec<u8> = version.iter().flat_map(|c| c.1.clone()).collect();
            assert_eq!(whole, expected);
        }
    }

    #[test]
    fn oversized_chunks_and_bytes_of_another_hash_are_refused() {
        let mut f = fixture(PACK_TARGET_SIZE);
        let mut w = f.store.writer().unwrap();
        let (h, d) = chunk(1, MAX_CHUNK_SIZE + 1);
        assert!(matches!(
            w.put(&mut f.index, &h, &d),
            Err(StoreError::TooLarge { len }) if len == MAX_CHUNK_SIZE + 1
        ));
        let (h, _) = chunk(1, 100);
        let (_, other) = chunk(2, 100);
        assert!(matches!(
            w.put(&mut f.index, &h, &other),
            Err(StoreError::HashMismatch { hash }) if hash == h
        ));
        let (h, d) = chunk(3, MAX_CHUNK_SIZE);
        assert!(w.put(&mut f.index, &h, &d).unwrap());
        w.finish(&mut f.index).unwrap();
        assert_eq!(f.read(&h).unwrap(), d);
    }

    #[test]
    fn a_corrupted_byte_is_reported_by_read_and_verify_with_the_pack_name() {
        let mut f = fixture(PACK_TARGET_SIZE);
        let chunks: Vec<_> = (0..3).map(|i| chunk(i, 3000)).collect();
        f.put(&chunks);
        reference(&f.index, &hashes(&chunks));
        assert!(f.store.verify(&f.index).unwrap().is_ok());

        let (loc, path) = f.pack_path_of(&chunks[1].0);
        flip_byte(&path, loc.offset + ENTRY_HEADER_LEN + 10);
        match f.read(&chunks[1].0) {
            Err(StoreError::Damaged { pack, hash, damage }) => {
                assert_eq!(pack, loc.pack_name);
                assert_eq!(hash, chunks[1].0);
                assert_eq!(damage, Damage::HashMismatch);
            }
            other => panic!("{other:?}"),
        }
        let err = f.read(&chunks[1].0).unwrap_err().to_string();
        assert!(err.contains(&loc.pack_name), "{err}");
        assert_eq!(f.read(&chunks[0].0).unwrap(), chunks[0].1);

        let report = f.store.verify(&f.index).unwrap();
        assert!(!report.is_ok());
        assert_eq!((report.packs, report.chunks), (1, 3));
        assert_eq!(
            report.damaged,
            vec![DamagedChunk {
                hash: chunks[1].0,
                pack: loc.pack_name.clone(),
                damage: Damage::HashMismatch,
            }]
        );
        assert_eq!(report.bytes, 6000);

        // A truncated pack, then a missing one.
        let (loc2, _) = f.pack_path_of(&chunks[2].0);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(loc2.offset + 40).unwrap();
        assert!(matches!(
            f.read(&chunks[2].0),
            Err(StoreError::Damaged {
                damage: Damage::Truncated,
                ..
            })
        ));
        fs::remove_file(&path).unwrap();
        assert!(matches!(
            f.read(&chunks[0].0),
            Err(StoreError::Damaged {
                damage: Damage::MissingPack,
                ..
            })
        ));
        let report = f.store.verify(&f.index).unwrap();
        assert_eq!(report.damaged.len(), 3);
        assert!(
            report
                .damaged
                .iter()
                .all(|d| d.damage == Damage::MissingPack)
        );
    }

    #[test]
    fn verify_lists_history_chunks_the_store_lacks() {
        let mut f = fixture(PACK_TARGET_SIZE);
        let stored = chunk(1, 100);
        let missing = chunk(2, 100);
        f.put(std::slice::from_ref(&stored));
        reference(&f.index, &[stored.0, missing.0]);
        let report = f.store.verify(&f.index).unwrap();
        assert!(report.damaged.is_empty());
        assert_eq!(report.unstored, vec![missing.0]);
    }

    #[test]
    fn a_pack_can_be_walked_without_the_index() {
        let mut f = fixture(PACK_TARGET_SIZE);
        let chunks: Vec<_> = (0..5).map(|i| chunk(i, 1000 + i as usize)).collect();
        f.put(&chunks);
        let pack = &f.index.store_packs().unwrap()[0];
        let path = pack_path(f.store.dir(), &pack.name).unwrap();
        let listing = read_pack_entries(&path).unwrap();
        assert!(listing.damage.is_empty());
        assert_eq!(listing.entries, f.index.store_pack_chunks(pack.id).unwrap());
        assert_eq!(fs::metadata(&path).unwrap().len(), pack.size);

        let third = listing.entries[2];
        flip_byte(&path, third.offset + ENTRY_HEADER_LEN);
        let listing = read_pack_entries(&path).unwrap();
        assert_eq!(listing.entries.len(), 4);
        assert_eq!(listing.damage, vec![(third.offset, Damage::HashMismatch)]);
        flip_byte(&path, 0);
        let listing = read_pack_entries(&path).unwrap();
        assert_eq!(listing.damage, vec![(0, Damage::BadHeader)]);
    }

    #[test]
    fn a_pack_sealed_but_not_committed_is_removed_at_open() {
        let mut f = fixture(PACK_TARGET_SIZE);
        let chunks: Vec<_> = (0..3).map(|i| chunk(i, 2000)).collect();
        let mut w = f.store.writer().unwrap();
        for (h, d) in &chunks {
            w.put(&mut f.index, h, d).unwrap();
        }
        // The process dies after the pack is in place, before the commit.
        let sealed = w.seal().unwrap().unwrap();
        drop(w);
        fs::write(f.store.dir().join("tmp").join("leftover.pack"), b"half").unwrap();
        assert_eq!(f.pack_files(), BTreeSet::from([sealed.name.clone()]));
        assert!(f.indexed_packs().is_empty());
        assert!(matches!(f.read(&chunks[0].0), Err(StoreError::NotFound(_))));

        f.reopen();
        assert!(f.pack_files().is_empty());
        assert!(files_in(&f.store.dir().join("tmp")).unwrap().is_empty());
        assert_eq!(f.store.stats(&f.index).unwrap(), StoreTotals::default());
        // The chunks can be stored again.
        f.put(&chunks);
        assert_eq!(f.read(&chunks[2].0).unwrap(), chunks[2].1);
    }

    #[test]
    fn a_writer_dropped_without_finishing_leaves_nothing() {
        let mut f = fixture(PACK_TARGET_SIZE);
        let mut w = f.store.writer().unwrap();
        let (h, d) = chunk(1, 100);
        w.put(&mut f.index, &h, &d).unwrap();
        assert_eq!(files_in(&f.store.dir().join("tmp")).unwrap().len(), 1);
        drop(w);
        assert!(files_in(&f.store.dir().join("tmp")).unwrap().is_empty());
        assert!(f.pack_files().is_empty());
        assert!(!f.index.store_contains(&h).unwrap());
    }

    #[test]
    fn gc_and_cleanup_wait_until_writers_and_readers_are_done() {
        let mut f = fixture(PACK_TARGET_SIZE);
        let w = f.store.writer().unwrap();
        assert!(matches!(
            f.store.cleanup_orphans(&f.index),
            Err(StoreError::Busy)
        ));
        assert!(matches!(f.store.gc(&mut f.index), Err(StoreError::Busy)));
        // Opening still works; it leaves the cleanup for later.
        f.reopen();
        drop(w);
        let r = f.store.reader().unwrap();
        assert!(matches!(f.store.gc(&mut f.index), Err(StoreError::Busy)));
        drop(r);
        f.store.gc(&mut f.index).unwrap();
    }

    /// Three packs of ten 1000-byte chunks (packs seal at 10 KB), the first
    /// and third chunk of every ten referenced.
    /// Chunks with their bytes.
    type Chunks = Vec<(ChunkHash, Vec<u8>)>;

    fn sparse_store() -> (Fixture, Chunks, Vec<ChunkHash>) {
        let mut f = fixture(10_000);
        let chunks: Vec<_> = (0..30).map(|i| chunk(i, 1000)).collect();
        f.put(&chunks);
        assert_eq!(f.index.store_packs().unwrap().len(), 3);
        let live: Vec<ChunkHash> = chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 10 == 0 || i % 10 == 2)
            .map(|(_, c)| c.0)
            .collect();
        reference(&f.index, &live);
        (f, chunks, live)
    }

    fn assert_consistent(f: &Fixture, chunks: &[(ChunkHash, Vec<u8>)], live: &[ChunkHash]) {
        for (h, d) in chunks {
            if live.contains(h) {
                assert_eq!(&f.read(h).unwrap(), d);
            }
        }
        let report = f.store.verify(&f.index).unwrap();
        assert!(report.is_ok(), "{report:?}");
    }

    #[test]
    fn gc_drops_unreferenced_chunks_and_rewrites_sparse_packs() {
        let (mut f, chunks, live) = sparse_store();
        let before = f.store.stats(&f.index).unwrap();
        let stats = f.store.gc(&mut f.index).unwrap();
        assert_eq!(stats.chunks_removed, 24);
        assert_eq!(stats.chunk_bytes_removed, 24_000);
        assert_eq!(stats.packs_deleted, 0);
        assert_eq!(stats.packs_rewritten, 3);
        assert_eq!(stats.packs_written, 1);
        assert!(stats.damaged.is_empty());
        let after = f.store.stats(&f.index).unwrap();
        assert_eq!(after.packs, 1);
        assert_eq!(after.chunks, 6);
        assert_eq!(
            after.pack_bytes,
            PACK_HEADER_LEN + 6 * (ENTRY_HEADER_LEN + 1000)
        );
        assert_eq!(stats.bytes_freed, before.pack_bytes - after.pack_bytes);
        assert_eq!(f.pack_files(), f.indexed_packs());
        assert_consistent(&f, &chunks, &live);
        for (h, _) in &chunks {
            assert_eq!(f.index.store_contains(h).unwrap(), live.contains(h));
        }
        // A second GC finds nothing to do.
        let again = f.store.gc(&mut f.index).unwrap();
        assert_eq!(again, GcStats::default());

        // Nothing referenced: every pack goes.
        unreference(&f.index, &live);
        let stats = f.store.gc(&mut f.index).unwrap();
        assert_eq!((stats.chunks_removed, stats.packs_deleted), (6, 1));
        assert!(f.pack_files().is_empty());
    }

    #[test]
    fn gc_leaves_a_damaged_live_chunk_and_its_pack_in_place() {
        let (mut f, chunks, live) = sparse_store();
        let (loc, path) = f.pack_path_of(&live[0]);
        flip_byte(&path, loc.offset + ENTRY_HEADER_LEN + 1);
        let stats = f.store.gc(&mut f.index).unwrap();
        assert_eq!(
            stats.damaged,
            vec![DamagedChunk {
                hash: live[0],
                pack: loc.pack_name.clone(),
                damage: Damage::HashMismatch,
            }]
        );
        assert_eq!(stats.packs_rewritten, 2);
        assert!(path.exists());
        assert_eq!(f.index.store_locate(&live[0]).unwrap().unwrap(), loc);
        assert_eq!(f.pack_files(), f.indexed_packs());
        let intact: Vec<ChunkHash> = live[1..].to_vec();
        assert_consistent_except(&f, &chunks, &intact, live[0]);
    }

    fn assert_consistent_except(
        f: &Fixture,
        chunks: &[(ChunkHash, Vec<u8>)],
        live: &[ChunkHash],
        damaged: ChunkHash,
    ) {
        for (h, d) in chunks {
            if live.contains(h) {
                assert_eq!(&f.read(h).unwrap(), d);
            }
        }
        let report = f.store.verify(&f.index).unwrap();
        let bad: Vec<ChunkHash> = report.damaged.iter().map(|d| d.hash).collect();
        assert_eq!(bad, vec![damaged]);
    }

    #[test]
    fn gc_killed_before_committing_a_rewritten_pack_loses_nothing() {
        let (mut f, chunks, live) = sparse_store();
        let old = f.indexed_packs();
        f.store
            .gc_until(&mut f.index, CrashAt::BeforeRewriteCommit)
            .unwrap();
        // The rows still point to the old packs, which are all there.
        assert_eq!(f.indexed_packs(), old);
        assert_eq!(f.pack_files().len(), old.len() + 1);
        assert_consistent(&f, &chunks, &live);
        f.reopen();
        assert_eq!(f.pack_files(), old);
        f.store.gc(&mut f.index).unwrap();
        assert_eq!(f.pack_files(), f.indexed_packs());
        assert_eq!(f.pack_files().len(), 1);
        assert_consistent(&f, &chunks, &live);
    }

    #[test]
    fn gc_killed_before_deleting_the_old_packs_loses_nothing() {
        let (mut f, chunks, live) = sparse_store();
        let old = f.indexed_packs();
        f.store
            .gc_until(&mut f.index, CrashAt::BeforeOldPackDelete)
            .unwrap();
        let new = f.indexed_packs();
        assert_eq!(new.len(), 1);
        assert!(new.is_disjoint(&old));
        assert_eq!(f.pack_files().len(), old.len() + 1);
        assert_consistent(&f, &chunks, &live);
        f.reopen();
        assert_eq!(f.pack_files(), new);
        assert_consistent(&f, &chunks, &live);
    }

    #[test]
    fn gc_killed_before_deleting_emptied_packs_loses_nothing() {
        let (mut f, chunks, _) = sparse_store();
        // Only the second pack's chunks stay referenced.
        unreference(&f.index, &hashes(&chunks));
        let live: Vec<ChunkHash> = hashes(&chunks[10..20]);
        reference(&f.index, &live);
        f.store
            .gc_until(&mut f.index, CrashAt::BeforeEmptyPackDelete)
            .unwrap();
        assert_eq!(f.indexed_packs().len(), 1);
        assert_eq!(f.pack_files().len(), 3);
        assert_consistent(&f, &chunks, &live);
        f.reopen();
        assert_eq!(f.pack_files(), f.indexed_packs());
        assert_consistent(&f, &chunks, &live);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(Vec<usize>),
        Reference(Vec<usize>),
        Unreference(Vec<usize>),
        Gc,
    }

    fn ops() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<Op>)> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..3000), 1..16).prop_flat_map(
            |chunks| {
                let n = chunks.len();
                let some = prop::collection::vec(0..n, 0..=n);
                let op = prop_oneof![
                    3 => some.clone().prop_map(Op::Put),
                    2 => some.clone().prop_map(Op::Reference),
                    1 => some.prop_map(Op::Unreference),
                    2 => Just(Op::Gc),
                ];
                (Just(chunks), prop::collection::vec(op, 1..20))
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn gc_keeps_every_referenced_chunk_and_drops_the_rest((data, ops) in ops()) {
            let mut f = fixture(4096);
            let chunks: Vec<(ChunkHash, Vec<u8>)> =
                data.into_iter().map(|d| (blake3::hash(&d).into(), d)).collect();
            let mut stored: HashSet<ChunkHash> = HashSet::new();
            let mut referenced: HashMap<ChunkHash, usize> = HashMap::new();
            for op in ops.iter().chain([&Op::Gc]) {
                match op {
                    Op::Put(ix) => {
                        let some: Vec<_> = ix.iter().map(|&i| chunks[i].clone()).collect();
                        f.put(&some);
                        stored.extend(hashes(&some));
                    }
                    Op::Reference(ix) => {
                        let some: Vec<_> = ix.iter().map(|&i| chunks[i].0).collect();
                        reference(&f.index, &some);
                        for h in some {
                            *referenced.entry(h).or_default() += 1;
                        }
                    }
                    Op::Unreference(ix) => {
                        let some: Vec<_> = ix.iter().map(|&i| chunks[i].0).collect();
                        unreference(&f.index, &some);
                        for h in some {
                            referenced.remove(&h);
                        }
                    }
                    Op::Gc => {
                        let stats = f.store.gc(&mut f.index).unwrap();
                        prop_assert!(stats.damaged.is_empty());
                        stored.retain(|h| referenced.contains_key(h));
                        prop_assert_eq!(f.pack_files(), f.indexed_packs());
                    }
                }
                for (h, d) in &chunks {
                    if stored.contains(h) {
                        prop_assert_eq!(&f.read(h).unwrap(), d);
                    } else {
                        prop_assert!(!f.index.store_contains(h).unwrap());
                    }
                }
                prop_assert_eq!(f.store.stats(&f.index).unwrap().chunks, stored.len() as u64);
            }
            let report = f.store.verify(&f.index).unwrap();
            prop_assert!(report.damaged.is_empty());
            let unstored: BTreeSet<ChunkHash> = referenced
                .keys()
                .filter(|h| !stored.contains(h))
                .copied()
                .collect();
            prop_assert_eq!(report.unstored.into_iter().collect::<BTreeSet<_>>(), unstored);
            // Whatever is left is live: a pack is either mostly live or was just written.
            for u in f.index.store_pack_usage().unwrap() {
                prop_assert!(u.live_chunks > 0);
            }
        }
    }
}
