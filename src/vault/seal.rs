//! Sealing and opening chunks and records (the format is in the module docs of
//! [`crate::vault`]).
//!
//! Opening checks, in order: the length is one a sealed item can have, the format
//! version, the key check, the folder tag, the id against the one asked for, the
//! AEAD tag (over the header and the folder id), the padding, and then what the
//! plaintext says about itself: a chunk must hash to its id, a record must be
//! well-formed, derive its id from its path and be no older than the caller
//! already knows. Every header field is authenticated, so an altered one can
//! only change which refusal is reported, never let anything through.

use chacha20poly1305::{AeadInOut, Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use super::keys::{ChunkId, KEY_CHECK_LEN, RecordId, VaultKeys};
use crate::chunking::{ChunkHash, FileHash};
use crate::device::{DeviceId, ShortId};
use crate::folder::FolderId;
use crate::index::FileKind;
use crate::relpath::RelPath;
use crate::version_vector::VersionVector;

/// The format version written as the first byte of every sealed item.
pub const FORMAT_VERSION: u8 = 1;

const FOLDER_TAG_LEN: usize = 4;
const FOLDER_TAG_CONTEXT: &str = "ferry 2026 vault folder-tag v1";
const ID_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Bytes before the ciphertext: version, key check, folder tag, id, nonce.
pub const HEADER_LEN: usize = 1 + KEY_CHECK_LEN + FOLDER_TAG_LEN + ID_LEN + NONCE_LEN;

/// Bytes a sealed item adds besides padding: the header and the AEAD tag.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// Smallest padded plaintext.
pub const MIN_PADDED: usize = 512;

/// Padded plaintexts of this size and over are whole multiples of it.
pub const PAD_BLOCK: usize = 4096;

/// Longest chunk [`seal_chunk`] takes, in bytes (ferry's chunks are at most 256 KiB).
pub const MAX_CHUNK_LEN: usize = 1 << 20;

/// Longest encoded record [`seal_record`] takes, in bytes.
pub const MAX_RECORD_LEN: usize = 96 << 20;

/// Most chunks one record lists (at ferry's 64 KiB mean chunk, a 128 GiB file).
pub const MAX_RECORD_CHUNKS: usize = 1 << 21;

/// Longest symlink target a record carries, in bytes.
pub const MAX_SYMLINK_LEN: usize = 4096;

/// Which kind of sealed item an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A sealed chunk.
    Chunk,
    /// A sealed record.
    Record,
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Item::Chunk => "chunk",
            Item::Record => "record",
        })
    }
}

/// Why a chunk or record cannot be sealed, or why a sealed one is refused.
///
/// The variants do not name the holder that served the bytes: this layer never
/// sees it. The caller that fetched them adds it with [`VaultError::from_holder`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// The input is over the limit for its kind.
    #[error("the {item} is {len} bytes, over the limit of {max}")]
    TooLarge {
        /// Chunk or record.
        item: Item,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The sealed bytes have a length no sealed item has.
    #[error(
        "the sealed {item} was cut short or extended ({len} bytes is not a length a sealed {item} has)"
    )]
    Truncated {
        /// Chunk or record.
        item: Item,
        /// The length received.
        len: usize,
    },
    /// The sealed bytes have an unknown format version.
    #[error(
        "the sealed {item} has format version {version}, made by a newer ferry (or altered); upgrade ferry on this device"
    )]
    UnsupportedVersion {
        /// Chunk or record.
        item: Item,
        /// The version byte found.
        version: u8,
    },
    /// The item was sealed with another folder secret (or its key check was altered).
    #[error(
        "the sealed {item} was sealed with a different folder key: the recovery code is for another folder, or the holder altered it"
    )]
    WrongKey {
        /// Chunk or record.
        item: Item,
    },
    /// The item belongs to another folder id (or its folder tag was altered).
    #[error("the sealed {item} belongs to another folder, or the holder altered it")]
    WrongFolder {
        /// Chunk or record.
        item: Item,
    },
    /// The holder served another chunk than the one asked for.
    #[error("asked for chunk {expected} but got chunk {found}: the holder swapped them")]
    Swapped {
        /// The id asked for.
        expected: ChunkId,
        /// The id the sealed bytes carry.
        found: ChunkId,
    },
    /// The holder served a record stored under another id.
    #[error("asked for record {expected} but got record {found}: the holder moved it")]
    Moved {
        /// The id asked for.
        expected: RecordId,
        /// The id the sealed bytes carry.
        found: RecordId,
    },
    /// Authentication failed: some byte of the sealed item was changed.
    #[error("the sealed {item} was altered (authentication failed)")]
    Tampered {
        /// Chunk or record.
        item: Item,
    },
    /// The chunk authenticated but does not hash to its id: whoever sealed it
    /// holds the key and made a mistake or an attack.
    #[error("chunk {id} decrypts to content that does not match its id")]
    ContentMismatch {
        /// The chunk's id.
        id: ChunkId,
    },
    /// The record is older than one the caller has already seen.
    #[error(
        "record {id} is at revision {found}, older than revision {min} seen before: the holder served an old copy (replay or rollback)"
    )]
    RolledBack {
        /// The record's id.
        id: RecordId,
        /// The revision it carries.
        found: u64,
        /// The lowest revision the caller accepts.
        min: u64,
    },
    /// The item authenticated but its contents are malformed (a bug or a
    /// misbehaving device that holds the key), or a record to seal is invalid.
    #[error("the {item} is malformed: {reason}")]
    Malformed {
        /// Chunk or record.
        item: Item,
        /// What is wrong.
        reason: String,
    },
}

/// A [`VaultError`] with the holder that served the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("holder {holder}: {error}")]
pub struct HolderError {
    /// The device that served the refused bytes.
    pub holder: DeviceId,
    /// What is wrong with them.
    pub error: VaultError,
}

impl VaultError {
    /// Names the holder that served the refused bytes.
    pub fn from_holder(self, holder: DeviceId) -> HolderError {
        HolderError {
            holder,
            error: self,
        }
    }
}

/// A chunk as a holder stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedChunk {
    /// What the holder calls it.
    pub id: ChunkId,
    /// The sealed bytes (format in [`crate::vault`]).
    pub bytes: Vec<u8>,
}

/// A record as a holder stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    /// What the holder calls it.
    pub id: RecordId,
    /// The sealed bytes (format in [`crate::vault`]).
    pub bytes: Vec<u8>,
}

/// What a directory entry is, as a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

impl From<FileKind> for RecordKind {
    fn from(k: FileKind) -> Self {
        match k {
            FileKind::File => RecordKind::File,
            FileKind::Dir => RecordKind::Dir,
            FileKind::Symlink => RecordKind::Symlink,
        }
    }
}

impl From<RecordKind> for FileKind {
    fn from(k: RecordKind) -> Self {
        match k {
            RecordKind::File => FileKind::File,
            RecordKind::Dir => FileKind::Dir,
            RecordKind::Symlink => FileKind::Symlink,
        }
    }
}

/// A file's index record as sealed for a holder: everything needed to rebuild the
/// file and its index row from the holder alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultRecord {
    /// Path inside the folder.
    pub path: RelPath,
    /// File, directory or symlink.
    pub kind: RecordKind,
    /// Size in bytes (files).
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Unix permission bits.
    pub permissions: u32,
    /// Whole-file blake3 (files).
    pub hash: Option<FileHash>,
    /// Link target (symlinks), at most [`MAX_SYMLINK_LEN`] bytes.
    pub symlink_target: Option<String>,
    /// A tombstone.
    pub deleted: bool,
    /// The version vector.
    pub version: VersionVector,
    /// The device that made this version.
    pub modified_by: ShortId,
    /// The chunks in order, plaintext hash and length, at most [`MAX_RECORD_CHUNKS`].
    pub chunks: Vec<(ChunkHash, u32)>,
    /// Grows each time the sealing device writes a record for this id; the
    /// opener refuses one older than it has seen.
    pub revision: u64,
    /// For a history version: when it was superseded, nanoseconds since the epoch.
    pub superseded_at_ns: Option<i64>,
}

impl VaultRecord {
    /// The id the holder stores it under: the path's current id, or for a
    /// history version the id of that path at this revision.
    pub fn id(&self, keys: &VaultKeys) -> RecordId {
        match self.superseded_at_ns {
            None => keys.record_id(&self.path),
            Some(_) => keys.history_record_id(&self.path, self.revision),
        }
    }
}

/// The record's encoding (postcard); changing it means a new [`FORMAT_VERSION`].
#[derive(Serialize, Deserialize)]
struct Encoded {
    path: String,
    kind: u8,
    size: u64,
    mtime_ns: i64,
    permissions: u32,
    hash: Option<[u8; 32]>,
    symlink_target: Option<String>,
    deleted: bool,
    version: Vec<u8>,
    modified_by: u64,
    chunks: Vec<([u8; 32], u32)>,
    revision: u64,
    superseded_at_ns: Option<i64>,
}

/// Seals a chunk for a holder. `hash` must be the blake3 of `bytes` (the hash
/// the index already holds); the chunk is padded (see [`padded_len`]).
///
/// # Panics
///
/// If the operating system's random number generator fails.
pub fn seal_chunk(
    keys: &VaultKeys,
    folder: &FolderId,
    hash: &ChunkHash,
    bytes: &[u8],
) -> Result<SealedChunk, VaultError> {
    if bytes.len() > MAX_CHUNK_LEN {
        return Err(VaultError::TooLarge {
            item: Item::Chunk,
            len: bytes.len(),
            max: MAX_CHUNK_LEN,
        });
    }
    let id = keys.chunk_id(hash);
    let bytes = seal(keys.chunk_cipher(), keys, folder, &id.0, bytes);
    Ok(SealedChunk { id, bytes })
}

/// Opens a chunk a holder served for `id`: refuses it (see the module docs)
/// unless it authenticates and its plaintext hashes to `id`.
pub fn open_chunk(
    keys: &VaultKeys,
    folder: &FolderId,
    id: &ChunkId,
    sealed: &[u8],
) -> Result<Vec<u8>, VaultError> {
    let plain = open(
        Item::Chunk,
        keys.chunk_cipher(),
        keys,
        folder,
        &id.0,
        sealed,
        MAX_CHUNK_LEN,
        |found| VaultError::Swapped {
            expected: *id,
            found: ChunkId(found),
        },
    )?;
    if keys.chunk_id(&ChunkHash::from(blake3::hash(&plain))) != *id {
        return Err(VaultError::ContentMismatch { id: *id });
    }
    Ok(plain)
}

/// Seals a record for a holder, under [`VaultRecord::id`].
///
/// # Panics
///
/// If the operating system's random number generator fails.
pub fn seal_record(
    keys: &VaultKeys,
    folder: &FolderId,
    record: &VaultRecord,
) -> Result<SealedRecord, VaultError> {
    let malformed = |reason: &str| VaultError::Malformed {
        item: Item::Record,
        reason: reason.to_owned(),
    };
    if record.chunks.len() > MAX_RECORD_CHUNKS {
        return Err(malformed("it lists too many chunks"));
    }
    if record
        .symlink_target
        .as_ref()
        .is_some_and(|t| t.len() > MAX_SYMLINK_LEN)
    {
        return Err(malformed("its symlink target is too long"));
    }
    let encoded = Encoded {
        path: record.path.as_str().to_owned(),
        kind: match record.kind {
            RecordKind::File => 0,
            RecordKind::Dir => 1,
            RecordKind::Symlink => 2,
        },
        size: record.size,
        mtime_ns: record.mtime_ns,
        permissions: record.permissions,
        hash: record.hash.map(|h| h.0),
        symlink_target: record.symlink_target.clone(),
        deleted: record.deleted,
        version: record.version.encode(),
        modified_by: record.modified_by.0,
        chunks: record.chunks.iter().map(|(h, n)| (h.0, *n)).collect(),
        revision: record.revision,
        superseded_at_ns: record.superseded_at_ns,
    };
    let plain =
        postcard::to_stdvec(&encoded).map_err(|e| malformed(&format!("cannot encode: {e}")))?;
    if plain.len() > MAX_RECORD_LEN {
        return Err(VaultError::TooLarge {
            item: Item::Record,
            len: plain.len(),
            max: MAX_RECORD_LEN,
        });
    }
    let id = record.id(keys);
    let bytes = seal(keys.record_cipher(), keys, folder, &id.0, &plain);
    Ok(SealedRecord { id, bytes })
}

/// Opens a record a holder served for `id`, refusing it (see the module docs)
/// unless it authenticates, is well-formed, belongs at `id` and has a revision of
/// at least `min_revision` (0 when nothing has been seen yet).
pub fn open_record(
    keys: &VaultKeys,
    folder: &FolderId,
    id: &RecordId,
    min_revision: u64,
    sealed: &[u8],
) -> Result<VaultRecord, VaultError> {
    let plain = open(
        Item::Record,
        keys.record_cipher(),
        keys,
        folder,
        &id.0,
        sealed,
        MAX_RECORD_LEN,
        |found| VaultError::Moved {
            expected: *id,
            found: RecordId(found),
        },
    )?;
    let malformed = |reason: String| VaultError::Malformed {
        item: Item::Record,
        reason,
    };
    let e: Encoded = postcard::from_bytes(&plain).map_err(|e| malformed(e.to_string()))?;
    if e.chunks.len() > MAX_RECORD_CHUNKS {
        return Err(malformed(format!("it lists {} chunks", e.chunks.len())));
    }
    if e.symlink_target
        .as_ref()
        .is_some_and(|t| t.len() > MAX_SYMLINK_LEN)
    {
        return Err(malformed("its symlink target is too long".to_owned()));
    }
    let record = VaultRecord {
        path: RelPath::new(&e.path).map_err(|err| malformed(format!("its path: {err}")))?,
        kind: match e.kind {
            0 => RecordKind::File,
            1 => RecordKind::Dir,
            2 => RecordKind::Symlink,
            k => return Err(malformed(format!("unknown kind {k}"))),
        },
        size: e.size,
        mtime_ns: e.mtime_ns,
        permissions: e.permissions,
        hash: e.hash.map(FileHash),
        symlink_target: e.symlink_target,
        deleted: e.deleted,
        version: VersionVector::decode(&e.version)
            .map_err(|err| malformed(format!("its version vector: {err}")))?,
        modified_by: ShortId(e.modified_by),
        chunks: e
            .chunks
            .into_iter()
            .map(|(h, n)| (ChunkHash(h), n))
            .collect(),
        revision: e.revision,
        superseded_at_ns: e.superseded_at_ns,
    };
    if record.id(keys) != *id {
        return Err(malformed("its path does not match its id".to_owned()));
    }
    if record.revision < min_revision {
        return Err(VaultError::RolledBack {
            id: *id,
            found: record.revision,
            min: min_revision,
        });
    }
    Ok(record)
}

/// The length a plaintext of `len` bytes (with its one-byte end marker) is padded
/// to: 512 bytes at least, then the next power of two up to 4 KiB, then the next
/// multiple of 4 KiB. So a holder learns a small item's size class and a large
/// one's size to 4 KiB, and no more; for ferry's chunks (16 to 256 KiB, about
/// 78 KiB on average) that costs about 2 KiB a chunk, under 3%.
pub fn padded_len(len: usize) -> usize {
    let n = len + 1;
    if n <= PAD_BLOCK {
        n.next_power_of_two().max(MIN_PADDED)
    } else {
        n.div_ceil(PAD_BLOCK) * PAD_BLOCK
    }
}

fn is_padded_len(n: usize) -> bool {
    if n <= PAD_BLOCK {
        n >= MIN_PADDED && n.is_power_of_two()
    } else {
        n.is_multiple_of(PAD_BLOCK)
    }
}

fn folder_tag(folder: &FolderId) -> [u8; FOLDER_TAG_LEN] {
    let hash = blake3::Hasher::new_derive_key(FOLDER_TAG_CONTEXT)
        .update(folder.as_str().as_bytes())
        .finalize();
    let mut out = [0u8; FOLDER_TAG_LEN];
    out.copy_from_slice(&hash.as_bytes()[..FOLDER_TAG_LEN]);
    out
}

/// The associated data: the whole header, then the folder id (last, so its
/// variable length is unambiguous).
fn aad(header: &[u8], folder: &FolderId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HEADER_LEN + folder.as_str().len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(folder.as_str().as_bytes());
    aad
}

fn seal(
    cipher: &XChaCha20Poly1305,
    keys: &VaultKeys,
    folder: &FolderId,
    id: &[u8; ID_LEN],
    plain: &[u8],
) -> Vec<u8> {
    let padded = padded_len(plain.len());
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).expect("the operating system's random number generator failed");
    let mut out = Vec::with_capacity(OVERHEAD + padded);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&keys.key_check());
    out.extend_from_slice(&folder_tag(folder));
    out.extend_from_slice(id);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    out.push(0x80);
    out.resize(HEADER_LEN + padded, 0);
    let (header, body) = out.split_at_mut(HEADER_LEN);
    let tag = cipher
        .encrypt_inout_detached(&XNonce::from(nonce), &aad(header, folder), body.into())
        .expect("XChaCha20-Poly1305 takes messages far longer than the vault's limits");
    out.extend_from_slice(&tag);
    out
}

#[allow(clippy::too_many_arguments)]
fn open(
    item: Item,
    cipher: &XChaCha20Poly1305,
    keys: &VaultKeys,
    folder: &FolderId,
    expected_id: &[u8; ID_LEN],
    sealed: &[u8],
    max_plain: usize,
    wrong_id: impl FnOnce([u8; ID_LEN]) -> VaultError,
) -> Result<Vec<u8>, VaultError> {
    let len = sealed.len();
    match sealed.first() {
        None => return Err(VaultError::Truncated { item, len }),
        Some(&FORMAT_VERSION) => {}
        Some(&version) => return Err(VaultError::UnsupportedVersion { item, version }),
    }
    let max = OVERHEAD + padded_len(max_plain);
    if len > max {
        return Err(VaultError::TooLarge { item, len, max });
    }
    if len < OVERHEAD || !is_padded_len(len - OVERHEAD) {
        return Err(VaultError::Truncated { item, len });
    }
    let (header, rest) = sealed.split_at(HEADER_LEN);
    let mut at = 1;
    let mut field = |n: usize| {
        let f = &header[at..at + n];
        at += n;
        f
    };
    if field(KEY_CHECK_LEN) != keys.key_check() {
        return Err(VaultError::WrongKey { item });
    }
    if field(FOLDER_TAG_LEN) != folder_tag(folder) {
        return Err(VaultError::WrongFolder { item });
    }
    let id = field(ID_LEN);
    if id != expected_id {
        let mut found = [0u8; ID_LEN];
        found.copy_from_slice(id);
        return Err(wrong_id(found));
    }
    let nonce = XNonce::try_from(field(NONCE_LEN)).expect("the header holds a whole nonce");
    let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
    let tag = Tag::try_from(tag).expect("the split leaves a whole tag");
    let mut plain = body.to_vec();
    cipher
        .decrypt_inout_detached(
            &nonce,
            &aad(header, folder),
            plain.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| VaultError::Tampered { item })?;
    // Strip the padding: zeros after a 0x80 end marker.
    match plain.iter().rposition(|&b| b != 0) {
        Some(end) if plain[end] == 0x80 => plain.truncate(end),
        _ => {
            return Err(VaultError::Malformed {
                item,
                reason: "its padding has no end marker".to_owned(),
            });
        }
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::keys::FolderSecret;
    use proptest::prelude::*;

    fn keys() -> VaultKeys {
        FolderSecret::from_bytes([7; 32]).keys()
    }

    fn folder() -> FolderId {
        FolderId::new("docs").unwrap()
    }

    fn chunk(bytes: &[u8]) -> SealedChunk {
        let hash = ChunkHash::from(blake3::hash(bytes));
        seal_chunk(&keys(), &folder(), &hash, bytes).unwrap()
    }

    fn record(path: &str, revision: u64) -> VaultRecord {
        VaultRecord {
            path: RelPath::new(path).unwrap(),
            kind: RecordKind::File,
            size: 70_000,
            mtime_ns: 1_767_225_600_000_000_000,
            permissions: 0o644,
            hash: Some(FileHash([1; 32])),
            symlink_target: None,
            deleted: false,
            version: VersionVector::new().with(ShortId(42), 3),
            modified_by: ShortId(42),
            chunks: vec![(ChunkHash([2; 32]), 65_536), (ChunkHash([3; 32]), 4_464)],
            revision,
            superseded_at_ns: None,
        }
    }

    fn sealed_record(r: &VaultRecord) -> SealedRecord {
        seal_record(&keys(), &folder(), r).unwrap()
    }

    #[test]
    fn chunks_round_trip_padded_and_id_keyed() {
        for len in [0, 1, 511, 512, 4095, 4096, 65_536, 70_001, MAX_CHUNK_LEN] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let sealed = chunk(&data);
            assert_eq!(sealed.bytes.len(), OVERHEAD + padded_len(len), "{len}");
            assert_eq!(
                sealed.id,
                keys().chunk_id(&ChunkHash::from(blake3::hash(&data)))
            );
            assert_eq!(
                open_chunk(&keys(), &folder(), &sealed.id, &sealed.bytes),
                Ok(data)
            );
        }
    }

    #[test]
    fn sealing_twice_gives_different_bytes() {
        let a = chunk(b"same");
        let b = chunk(b"same");
        assert_eq!(a.id, b.id);
        assert_ne!(a.bytes, b.bytes);
    }

    #[test]
    fn sealed_bytes_contain_no_plaintext() {
        let text = b"Quarterly report: confidential numbers inside".repeat(40);
        let sealed = chunk(&text);
        assert!(
            !sealed
                .bytes
                .windows(16)
                .any(|w| text.windows(16).any(|t| t == w))
        );
        let rec = sealed_record(&record("secret-plans/report.txt", 1));
        let name = b"secret-plans";
        assert!(!rec.bytes.windows(name.len()).any(|w| w == name));
    }

    #[test]
    fn padding_hides_sizes_within_a_bucket() {
        assert_eq!(padded_len(0), 512);
        assert_eq!(padded_len(511), 512);
        assert_eq!(padded_len(512), 1024);
        assert_eq!(padded_len(4095), 4096);
        assert_eq!(padded_len(4096), 8192);
        assert_eq!(padded_len(65_536), 69_632);
        assert_eq!(
            chunk(&[1; 61_000]).bytes.len(),
            chunk(&[2; 61_400]).bytes.len()
        );
        for n in 0..20_000 {
            assert!(is_padded_len(padded_len(n)), "{n}");
        }
    }

    #[test]
    fn a_changed_byte_anywhere_is_refused() {
        let sealed = chunk(&[5; 3000]);
        for i in 0..sealed.bytes.len() {
            let mut bad = sealed.bytes.clone();
            bad[i] ^= 0x01;
            let err = open_chunk(&keys(), &folder(), &sealed.id, &bad).unwrap_err();
            let want_kind = match i {
                0 => matches!(err, VaultError::UnsupportedVersion { .. }),
                1..5 => err == VaultError::WrongKey { item: Item::Chunk },
                5..9 => err == VaultError::WrongFolder { item: Item::Chunk },
                9..41 => matches!(err, VaultError::Swapped { .. }),
                _ => err == VaultError::Tampered { item: Item::Chunk },
            };
            assert!(want_kind, "byte {i}: {err:?}");
        }
    }

    #[test]
    fn truncated_or_extended_bytes_are_refused() {
        let sealed = chunk(&[5; 3000]);
        let id = sealed.id;
        for len in [0, 1, HEADER_LEN, OVERHEAD, sealed.bytes.len() - 1] {
            assert_eq!(
                open_chunk(&keys(), &folder(), &id, &sealed.bytes[..len]),
                Err(VaultError::Truncated {
                    item: Item::Chunk,
                    len
                }),
                "{len}"
            );
        }
        let mut longer = sealed.bytes.clone();
        longer.push(0);
        assert!(matches!(
            open_chunk(&keys(), &folder(), &id, &longer),
            Err(VaultError::Truncated { .. })
        ));
        // Cut by a whole padding bucket: the length is plausible, the tag is not.
        let bucket_cut = &sealed.bytes[..OVERHEAD + 2048];
        assert_eq!(
            open_chunk(&keys(), &folder(), &id, bucket_cut),
            Err(VaultError::Tampered { item: Item::Chunk })
        );
        let huge = vec![FORMAT_VERSION; OVERHEAD + padded_len(MAX_CHUNK_LEN) + 1];
        assert!(matches!(
            open_chunk(&keys(), &folder(), &id, &huge),
            Err(VaultError::TooLarge { .. })
        ));
    }

    #[test]
    fn swapped_chunks_are_refused() {
        let a = chunk(b"chunk a");
        let b = chunk(b"chunk b");
        assert_eq!(
            open_chunk(&keys(), &folder(), &a.id, &b.bytes),
            Err(VaultError::Swapped {
                expected: a.id,
                found: b.id
            })
        );
        // The id in the header rewritten to the one asked for: the tag catches it.
        let mut relabelled = b.bytes.clone();
        relabelled[9..41].copy_from_slice(&a.id.0);
        assert_eq!(
            open_chunk(&keys(), &folder(), &a.id, &relabelled),
            Err(VaultError::Tampered { item: Item::Chunk })
        );
    }

    #[test]
    fn a_chunk_sealed_under_the_wrong_hash_is_refused() {
        let wrong = ChunkHash::from(blake3::hash(b"something else"));
        let sealed = seal_chunk(&keys(), &folder(), &wrong, b"actual bytes").unwrap();
        assert_eq!(
            open_chunk(&keys(), &folder(), &sealed.id, &sealed.bytes),
            Err(VaultError::ContentMismatch { id: sealed.id })
        );
    }

    #[test]
    fn wrong_folder_and_wrong_key_are_named() {
        let sealed = chunk(b"data");
        let other = FolderId::new("photos").unwrap();
        assert_eq!(
            open_chunk(&keys(), &other, &sealed.id, &sealed.bytes),
            Err(VaultError::WrongFolder { item: Item::Chunk })
        );
        let stranger = FolderSecret::generate().keys();
        assert_eq!(
            open_chunk(&stranger, &folder(), &sealed.id, &sealed.bytes),
            Err(VaultError::WrongKey { item: Item::Chunk })
        );
        let r = sealed_record(&record("a.txt", 1));
        assert_eq!(
            open_record(&stranger, &folder(), &r.id, 0, &r.bytes),
            Err(VaultError::WrongKey { item: Item::Record })
        );
        assert_eq!(
            open_record(&keys(), &other, &r.id, 0, &r.bytes),
            Err(VaultError::WrongFolder { item: Item::Record })
        );
    }

    #[test]
    fn oversized_input_is_refused_when_sealing() {
        let big = vec![0; MAX_CHUNK_LEN + 1];
        let hash = ChunkHash::from(blake3::hash(&big));
        assert!(matches!(
            seal_chunk(&keys(), &folder(), &hash, &big),
            Err(VaultError::TooLarge { .. })
        ));
        let mut r = record("a", 1);
        r.symlink_target = Some("x".repeat(MAX_SYMLINK_LEN + 1));
        assert!(matches!(
            seal_record(&keys(), &folder(), &r),
            Err(VaultError::Malformed { .. })
        ));
    }

    #[test]
    fn records_round_trip_including_history_versions() {
        let r = record("dir/a file.txt", 9);
        let sealed = sealed_record(&r);
        assert_eq!(sealed.id, keys().record_id(&r.path));
        assert_eq!(
            open_record(&keys(), &folder(), &sealed.id, 9, &sealed.bytes),
            Ok(r.clone())
        );
        let mut old = r.clone();
        old.revision = 4;
        old.superseded_at_ns = Some(1_767_300_000_000_000_000);
        old.kind = RecordKind::Symlink;
        old.symlink_target = Some("../elsewhere".to_owned());
        old.chunks.clear();
        let sealed_old = sealed_record(&old);
        assert_eq!(sealed_old.id, keys().history_record_id(&old.path, 4));
        assert_ne!(sealed_old.id, sealed.id);
        assert_eq!(
            open_record(&keys(), &folder(), &sealed_old.id, 4, &sealed_old.bytes),
            Ok(old)
        );
    }

    #[test]
    fn a_replayed_older_record_is_refused() {
        let old = sealed_record(&record("a.txt", 3));
        let new = sealed_record(&record("a.txt", 4));
        assert_eq!(old.id, new.id);
        assert!(open_record(&keys(), &folder(), &new.id, 4, &new.bytes).is_ok());
        assert_eq!(
            open_record(&keys(), &folder(), &new.id, 4, &old.bytes),
            Err(VaultError::RolledBack {
                id: new.id,
                found: 3,
                min: 4
            })
        );
    }

    #[test]
    fn a_record_moved_to_another_id_is_refused() {
        let a = sealed_record(&record("a.txt", 1));
        let b = sealed_record(&record("b.txt", 1));
        assert_eq!(
            open_record(&keys(), &folder(), &b.id, 0, &a.bytes),
            Err(VaultError::Moved {
                expected: b.id,
                found: a.id
            })
        );
        let mut relabelled = a.bytes.clone();
        relabelled[9..41].copy_from_slice(&b.id.0);
        assert_eq!(
            open_record(&keys(), &folder(), &b.id, 0, &relabelled),
            Err(VaultError::Tampered { item: Item::Record })
        );
        // A chunk served where a record was asked for is refused too.
        let c = chunk(b"not a record");
        assert!(open_record(&keys(), &folder(), &RecordId(c.id.0), 0, &c.bytes).is_err());
    }

    #[test]
    fn a_record_sealed_under_another_path_id_is_malformed() {
        // Only a device with the key can do this; the opener still refuses it.
        let r = record("a.txt", 1);
        let wrong_id = keys().record_id(&RelPath::new("b.txt").unwrap());
        let plain = postcard::to_stdvec(&Encoded {
            path: "a.txt".to_owned(),
            kind: 0,
            size: 0,
            mtime_ns: 0,
            permissions: 0,
            hash: None,
            symlink_target: None,
            deleted: false,
            version: Vec::new(),
            modified_by: 0,
            chunks: Vec::new(),
            revision: r.revision,
            superseded_at_ns: None,
        })
        .unwrap();
        let bytes = seal(
            keys().record_cipher(),
            &keys(),
            &folder(),
            &wrong_id.0,
            &plain,
        );
        assert!(matches!(
            open_record(&keys(), &folder(), &wrong_id, 0, &bytes),
            Err(VaultError::Malformed { .. })
        ));
        let garbage = seal(
            keys().record_cipher(),
            &keys(),
            &folder(),
            &wrong_id.0,
            &[0xff; 40],
        );
        assert!(matches!(
            open_record(&keys(), &folder(), &wrong_id, 0, &garbage),
            Err(VaultError::Malformed { .. })
        ));
    }

    #[test]
    fn errors_say_what_happened_and_take_the_holder() {
        let holder = DeviceId::new(iroh_base::SecretKey::from_bytes(&[3; 32]).public());
        let e = VaultError::Tampered { item: Item::Chunk }.from_holder(holder);
        let text = e.to_string();
        assert!(text.starts_with(&format!("holder {holder}: ")), "{text}");
        assert!(text.contains("chunk was altered"), "{text}");
        let rb = VaultError::RolledBack {
            id: RecordId([0; 32]),
            found: 1,
            min: 2,
        };
        assert!(rb.to_string().contains("rollback"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_chunk_round_trips(data in prop::collection::vec(any::<u8>(), 0..9000)) {
            let sealed = chunk(&data);
            prop_assert_eq!(open_chunk(&keys(), &folder(), &sealed.id, &sealed.bytes), Ok(data));
        }

        #[test]
        fn any_single_byte_change_to_a_chunk_is_refused(
            data in prop::collection::vec(any::<u8>(), 0..5000),
            at in any::<prop::sample::Index>(),
            flip in 1u8..,
        ) {
            let sealed = chunk(&data);
            let mut bad = sealed.bytes.clone();
            let i = at.index(bad.len());
            bad[i] ^= flip;
            prop_assert!(open_chunk(&keys(), &folder(), &sealed.id, &bad).is_err());
        }

        #[test]
        fn any_record_round_trips_and_any_byte_change_is_refused(
            path in "[a-z]{1,12}(/[a-z0-9 ._-]{1,12}){0,3}",
            revision in any::<u64>(),
            n_chunks in 0usize..300,
            at in any::<prop::sample::Index>(),
            flip in 1u8..,
        ) {
            prop_assume!(RelPath::new(&path).is_ok());
            let mut r = record(&path, revision);
            r.chunks = (0..n_chunks).map(|i| (ChunkHash([i as u8; 32]), i as u32)).collect();
            let sealed = sealed_record(&r);
            prop_assert_eq!(
                open_record(&keys(), &folder(), &sealed.id, revision, &sealed.bytes),
                Ok(r)
            );
            let mut bad = sealed.bytes.clone();
            let i = at.index(bad.len());
            bad[i] ^= flip;
            prop_assert!(open_record(&keys(), &folder(), &sealed.id, 0, &bad).is_err());
        }
    }
}
