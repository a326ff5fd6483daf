//! The wire protocol: every message that crosses a link between devices, and
//! its bounded framing. This is the one place the wire format is written down.
//!
//! # Versions
//! The protocol version is in the ALPN of each connection: [`PAIR_ALPN`] for
//! pairing, [`SYNC_ALPN`] for everything between paired devices. A change that
//! an older ferry cannot read gets a new ALPN; the `version` fields in
//! [`PairMessage::Request`] and [`SyncMessage::Hello`] name the minor revision.
//!
//! # Framing
//! A frame is a 4-byte big-endian payload length followed by the payload, the
//! [postcard] encoding of one message. Payloads over [`MAX_FRAME`] are refused
//! before anything is allocated for them; decoding never panics, and every
//! variable-length field is checked against its own limit after decoding.
//!
//! # Pairing (`ferry/pair/2`)
//! The joiner opens one bi-stream and sends [`PairMessage::Request`]; the
//! inviter answers with [`PairMessage::Accepted`] or [`PairMessage::Refused`]
//! and both close. The request proves knowledge of the invite secret with a MAC
//! over both device ids (see `pairing`), so it is useless to anyone else.
//!
//! # Sync (`ferry/sync/2`)
//! The dialer opens a control bi-stream and sends [`SyncMessage::Hello`]; the
//! acceptor answers with its own. Either side may later send
//! [`SyncMessage::Folders`] on the same stream when the folders it shares with
//! the other change.
//!
//! A folder is synced over a link when both hellos list it. The hello also
//! carries, per folder, how much of the receiver's index the sender already
//! holds ([`IndexState`]: the receiver's index epoch and sequence number as last
//! seen). Each side then opens one uni-stream and sends [`IndexMessage::Update`]s
//! with the file records the other lacks (those with a higher sequence, or all
//! of them when the epoch differs), then keeps sending new records as local
//! changes commit. So a reconnect sends only the delta.
//!
//! A file record carries its chunk list in content-defined *groups*
//! ([`WireGroup`]: a run of chunks ending at a chunk whose hash has its low
//! seven bits zero, at most [`MAX_GROUP_CHUNKS`] chunks). An edit changes one or
//! two groups, so a large file's update costs a few group hashes; a receiver
//! rebuilds the groups it already holds from its own chunk lists and asks for
//! the rest with [`Request::Groups`].
//!
//! Every other exchange is a request on its own bi-stream: the requester sends
//! one [`Request`] frame, the server answers with one [`Reply`] frame; a
//! [`Reply::Chunk`] is followed by exactly `size` raw bytes (not a frame), which
//! the requester checks against the chunk hash it asked for.
//!
//! # Encrypted backup holders (revision 3, `ferry/sync/2`)
//! A folder offered with [`FolderOffer::encrypted`] asks the receiver to hold
//! it sealed (see `vault`): the receiver keeps a *vault* for it, and lists it
//! back in its own hello, encrypted, once it has accepted. The folder's device
//! then sends it sealed chunks and records with [`Request::VaultMissing`],
//! [`Request::VaultPutChunks`] (followed by their raw sealed bytes) and
//! [`Request::VaultPutRecords`]; any paired device may read a vault back with
//! [`Request::VaultList`], [`Request::VaultRecords`] and
//! [`Request::VaultChunk`] (answered with [`Reply::VaultBytes`] and `size` raw
//! bytes). Only the device that shared a vault may write to it; the holder
//! cannot check what it stores, the reader checks everything it gets.
//!
//! Revision 4 lets the owner mirror its retention on the holder: it pages
//! through the chunk ids the holder keeps with [`Request::VaultChunkIds`]
//! (answered with [`Reply::VaultIds`]) and drops the records of versions its
//! history pruned and the chunks nothing it keeps refers to with
//! [`Request::VaultDrop`].

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// ALPN of the pairing handshake.
pub const PAIR_ALPN: &[u8] = b"ferry/pair/2";
/// ALPN of links between paired devices.
pub const SYNC_ALPN: &[u8] = b"ferry/sync/2";
/// Minor revision of both protocols.
pub const PROTOCOL_VERSION: u16 = 4;
/// Largest frame payload accepted, in bytes.
pub const MAX_FRAME: usize = 1 << 20;
/// Longest device name or folder label accepted from a peer, in bytes.
pub const MAX_NAME: usize = 256;
/// Most addresses a peer may announce.
pub const MAX_ADDRS: usize = 16;
/// Most folders one message may list.
pub const MAX_FOLDERS: usize = 4096;
/// Longest path (bytes) accepted in a file record.
pub const MAX_PATH: usize = 4096;
/// Most file records in one index update.
pub const MAX_FILES_PER_UPDATE: usize = 8192;
/// Most chunk groups one file record may carry (with at least one chunk of up to
/// 256 KiB per group, far beyond any real file).
pub const MAX_GROUPS: usize = 16_384;
/// Most chunks in one group.
pub const MAX_GROUP_CHUNKS: usize = 1024;
/// Most groups one request may ask for.
pub const MAX_GROUPS_PER_REQUEST: usize = 64;
/// Largest chunk a peer may send or ask for.
pub const MAX_CHUNK: u32 = 1 << 20;
/// Most entries in a version vector.
pub const MAX_VERSION_ENTRIES: usize = 1024;
/// Most versions one [`Reply::History`] may list.
pub const MAX_VERSIONS_PER_REPLY: usize = 1000;
/// Most chunk entries one [`Reply::Chunks`] page may hold.
pub const MAX_CHUNKS_PER_REPLY: usize = 16_384;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed.
    #[error("link error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer announced a frame over the limit.
    #[error("peer sent a frame of {0} bytes, over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// The stream ended inside a frame.
    #[error("the link closed in the middle of a message")]
    Truncated,
    /// The payload is not a valid message.
    #[error("peer sent a malformed message: {0}")]
    Malformed(String),
}

/// A folder as offered to a peer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderOffer {
    /// The folder id shared by every device.
    pub id: String,
    /// The offering device's label for it.
    pub label: String,
    /// Offered (or, from a holder, held) as an encrypted backup: the
    /// receiver stores it sealed and never gets its key (revision 3).
    pub encrypted: bool,
    /// The folder's vault secret, sent to trusted devices only (never with
    /// `encrypted`), so that every device of a folder seals it alike and any
    /// of them can read what a holder keeps (revision 3).
    pub secret: Option<[u8; 32]>,
}

impl std::fmt::Debug for FolderOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FolderOffer")
            .field("id", &self.id)
            .field("label", &self.label)
            .field("encrypted", &self.encrypted)
            .field("secret", &self.secret.map(|_| ".."))
            .finish()
    }
}

/// Why an inviter refused a pairing request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PairRefusal {
    /// No pending invite has this code.
    #[error(
        "the inviting device does not know this code (never issued, cancelled, or its agent restarted since)"
    )]
    UnknownCode,
    /// The invite expired.
    #[error("the invite code has expired; ask for a new one")]
    Expired,
    /// The invite was already used.
    #[error("the invite code has already been used; ask for a new one")]
    AlreadyUsed,
    /// The proof did not match the invite's secret.
    #[error("the invite code does not match (a wrong or altered code)")]
    BadProof,
    /// The joiner speaks another revision.
    #[error("the two devices run incompatible ferry versions; upgrade both")]
    UnsupportedVersion,
    /// The inviter failed to record the pairing.
    #[error("the inviting device could not record the pairing; see its log")]
    Internal,
}

/// Messages of the pairing handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairMessage {
    /// Joiner → inviter: "I hold the code".
    Request {
        /// [`PROTOCOL_VERSION`] of the joiner.
        version: u16,
        /// Which invite (derived from its secret; reveals nothing of it).
        invite_id: [u8; 16],
        /// MAC of both device ids under a key derived from the invite secret.
        proof: [u8; 32],
        /// The joiner's device name.
        name: String,
        /// The joiner's direct addresses.
        addrs: Vec<SocketAddr>,
    },
    /// Inviter → joiner: paired.
    Accepted {
        /// The inviter's device name.
        name: String,
        /// The folder the invite shares, if any.
        folder: Option<FolderOffer>,
    },
    /// Inviter → joiner: not paired, and why.
    Refused {
        /// The reason.
        reason: PairRefusal,
    },
}

/// What the sender of a hello holds of the receiver's index of one folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexState {
    /// The folder id.
    pub folder: String,
    /// The receiver's index epoch as last seen (0: nothing seen).
    pub epoch: u64,
    /// The highest sequence number of the receiver's records held.
    pub sequence: u64,
}

/// Messages on the control stream of a sync link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncMessage {
    /// First message each way.
    Hello {
        /// [`PROTOCOL_VERSION`] of the sender.
        version: u16,
        /// The sender's device name.
        name: String,
        /// The folders the sender shares with the receiver.
        folders: Vec<FolderOffer>,
        /// Per shared folder, how much of the receiver's index the sender holds.
        index: Vec<IndexState>,
    },
    /// The folders the sender shares with the receiver, after a change.
    Folders {
        /// All of them, not a delta.
        folders: Vec<FolderOffer>,
    },
}

/// One run of chunks of a file (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGroup {
    /// blake3 over the group's chunk entries (hash, then size as u32 LE).
    pub hash: [u8; 32],
    /// Number of chunks.
    pub chunks: u32,
    /// Total bytes.
    pub size: u64,
}

/// One chunk as listed in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireChunk {
    /// blake3 of its bytes.
    pub hash: [u8; 32],
    /// Its length.
    pub size: u32,
}

/// A file record as the sender's index holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFile {
    /// Path inside the folder (`/`-separated; validated by the receiver).
    pub path: String,
    /// 0 file, 1 directory, 2 symlink.
    pub kind: u8,
    /// Size in bytes (files).
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Unix permission bits.
    pub permissions: u32,
    /// Whole-file blake3 (files).
    pub hash: Option<[u8; 32]>,
    /// Link target (symlinks).
    pub symlink_target: Option<String>,
    /// A tombstone.
    pub deleted: bool,
    /// Version vector: (device short id, counter) pairs.
    pub version: Vec<(u64, u64)>,
    /// Short id of the device that made this version.
    pub modified_by: u64,
    /// The sender's sequence number of this record.
    pub sequence: u64,
    /// The chunk list, in groups (files).
    pub groups: Vec<WireGroup>,
}

/// A version of a file as the device holding it keeps it in its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireVersion {
    /// The holder's history id (what [`Request::VersionChunks`] names).
    pub id: i64,
    /// The path it was at (`/`-separated; validated by the receiver).
    pub path: String,
    /// 0 file, 1 directory, 2 symlink.
    pub kind: u8,
    /// Size in bytes (files).
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Unix permission bits.
    pub permissions: u32,
    /// Whole-file blake3 (files).
    pub hash: Option<[u8; 32]>,
    /// Link target (symlinks).
    pub symlink_target: Option<String>,
    /// Short id of the device that made this version.
    pub modified_by: u64,
    /// That device's name, if the holder knows it.
    pub device: Option<String>,
    /// When it left its path on the holder (Unix seconds).
    pub superseded_at: i64,
    /// Why it left (`replaced`, `deleted`, `conflict`, `restored-over`, `local`).
    pub reason: String,
}

/// Messages on the index uni-stream of a sync link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexMessage {
    /// File records of one folder, in increasing sequence order.
    Update {
        /// The folder id.
        folder: String,
        /// The sender's index epoch for the folder (changes if its index was
        /// rebuilt, so the receiver knows to start over).
        epoch: u64,
        /// The sender's folder sequence once these records are applied.
        sequence: u64,
        /// The records.
        files: Vec<WireFile>,
    },
}

/// A request on its own bi-stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The bytes of one chunk of a file in a folder.
    Chunk {
        /// The folder id.
        folder: String,
        /// A file that holds the chunk (a hint; any file of the folder may serve).
        path: String,
        /// Where in that file.
        offset: u64,
        /// The chunk's length.
        size: u32,
        /// Its blake3 hash.
        hash: [u8; 32],
    },
    /// The chunk entries of some groups of a file's current version.
    Groups {
        /// The folder id.
        folder: String,
        /// The file.
        path: String,
        /// The version's whole-file hash (so a changed file is not mistaken).
        file_hash: [u8; 32],
        /// Which groups, by index in the record's group list.
        groups: Vec<u32>,
    },
    /// The versions the server keeps in its history of a path, or of every
    /// path below it (revision 2).
    History {
        /// The folder id.
        folder: String,
        /// The path (empty: the whole folder).
        path: String,
    },
    /// A page of the chunk list of one version the server keeps (revision 2).
    VersionChunks {
        /// The folder id (the version must be of this folder).
        folder: String,
        /// The version's history id on the server.
        id: i64,
        /// Index of the first chunk wanted.
        start: u32,
    },
    /// Which of these sealed chunks the holder lacks (revision 3).
    VaultMissing {
        /// The folder id.
        folder: String,
        /// Keyed chunk ids, at most [`MAX_VAULT_IDS`].
        ids: Vec<[u8; 32]>,
    },
    /// Store sealed chunks; their bytes follow, raw, one after the other
    /// (revision 3).
    VaultPutChunks {
        /// The folder id.
        folder: String,
        /// Each chunk's keyed id and sealed length, at most
        /// [`MAX_PUT_CHUNKS`], each at most [`MAX_SEALED_CHUNK`], together at
        /// most [`MAX_PUT_BYTES`].
        chunks: Vec<([u8; 32], u32)>,
    },
    /// Store sealed records, replacing those with the same ids (revision 3).
    VaultPutRecords {
        /// The folder id.
        folder: String,
        /// (keyed record id, sealed bytes), each at most [`MAX_INLINE_RECORD`].
        records: Vec<([u8; 32], Vec<u8>)>,
    },
    /// Store one sealed record too large to send inline; `size` raw bytes
    /// follow (revision 3).
    VaultPutRecord {
        /// The folder id.
        folder: String,
        /// Its keyed id.
        id: [u8; 32],
        /// Its sealed length, at most [`MAX_SEALED_RECORD`].
        size: u32,
    },
    /// The vaults the server holds (revision 3).
    VaultList,
    /// A page of a vault's sealed records, by id after `after` (revision 3).
    VaultRecords {
        /// The folder id.
        folder: String,
        /// The last id of the previous page.
        after: Option<[u8; 32]>,
    },
    /// One sealed chunk (revision 3).
    VaultChunk {
        /// The folder id.
        folder: String,
        /// Its keyed id.
        id: [u8; 32],
    },
    /// One sealed record, one a page listed as too large to carry (revision 3).
    VaultRecord {
        /// The folder id.
        folder: String,
        /// Its keyed id.
        id: [u8; 32],
    },
    /// A page of the keyed ids of the sealed chunks a vault holds, after
    /// `after` (revision 4).
    VaultChunkIds {
        /// The folder id.
        folder: String,
        /// The last id of the previous page.
        after: Option<[u8; 32]>,
    },
    /// Drop sealed records and chunks the owner no longer keeps (revision 4).
    VaultDrop {
        /// The folder id.
        folder: String,
        /// Keyed record ids, at most [`MAX_VAULT_IDS`].
        records: Vec<[u8; 32]>,
        /// Keyed chunk ids, at most [`MAX_VAULT_IDS`].
        chunks: Vec<[u8; 32]>,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The chunk follows as `size` raw bytes.
    Chunk {
        /// Its length.
        size: u32,
    },
    /// The asked-for groups, in the order asked.
    Groups {
        /// Each group's chunks.
        groups: Vec<Vec<WireChunk>>,
    },
    /// The request cannot be served (file changed, folder not shared, ...).
    Unavailable {
        /// Why, for the log.
        reason: String,
    },
    /// The versions asked for, newest first.
    History {
        /// At most [`MAX_VERSIONS_PER_REPLY`] of them.
        versions: Vec<WireVersion>,
        /// More versions are kept than the reply could carry.
        truncated: bool,
    },
    /// A page of a version's chunk list, in file order.
    Chunks {
        /// The chunks from the `start` asked for.
        chunks: Vec<WireChunk>,
        /// More chunks follow this page.
        more: bool,
    },
    /// Which of the ids asked about the holder lacks, as indexes.
    VaultMissing {
        /// Indexes into the request's ids.
        missing: Vec<u32>,
    },
    /// Stored.
    VaultStored,
    /// The vaults the server holds: (folder id, label).
    Vaults {
        /// At most [`MAX_FOLDERS`].
        vaults: Vec<(String, String)>,
    },
    /// A page of sealed records.
    VaultRecords {
        /// (keyed record id, sealed bytes), each at most [`MAX_INLINE_RECORD`].
        records: Vec<([u8; 32], Vec<u8>)>,
        /// The ids of larger records in the page, to ask for one by one.
        large: Vec<[u8; 32]>,
        /// More follow.
        more: bool,
    },
    /// The sealed chunk or record asked for follows as `size` raw bytes.
    VaultBytes {
        /// Its length.
        size: u32,
    },
    /// A page of keyed ids (revision 4).
    VaultIds {
        /// At most [`MAX_VAULT_IDS`], in increasing order.
        ids: Vec<[u8; 32]>,
        /// More follow.
        more: bool,
    },
}

/// Most ids in one [`Request::VaultMissing`].
pub const MAX_VAULT_IDS: usize = 4096;
/// Largest sealed chunk: the largest chunk, padded, with its header and tag.
pub const MAX_SEALED_CHUNK: u32 = MAX_CHUNK + 8192;
/// Most chunks in one [`Request::VaultPutChunks`].
pub const MAX_PUT_CHUNKS: usize = 256;
/// Most bytes of sealed chunks in one [`Request::VaultPutChunks`].
pub const MAX_PUT_BYTES: usize = 16 << 20;
/// Largest sealed record (a file of about 2 million chunks).
pub const MAX_SEALED_RECORD: u32 = 96 * 1024 * 1024 + 8192;
/// Largest sealed record carried inside a frame; larger ones go on their own.
pub const MAX_INLINE_RECORD: usize = 64 * 1024;
/// Most ids of large records listed in one page.
pub const MAX_LARGE_PER_PAGE: usize = 1024;

/// Checks the limits a decoded message must respect.
pub trait Bounded {
    /// `Err` with a description if a field is over its limit.
    fn check(&self) -> Result<(), String>;
}

fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_NAME {
        return Err(format!("{what} of {} bytes", s.len()));
    }
    Ok(())
}

fn check_folders(folders: &[FolderOffer]) -> Result<(), String> {
    if folders.len() > MAX_FOLDERS {
        return Err(format!("{} folders", folders.len()));
    }
    for f in folders {
        check_name("folder id", &f.id)?;
        check_name("folder label", &f.label)?;
    }
    Ok(())
}

impl Bounded for PairMessage {
    fn check(&self) -> Result<(), String> {
        match self {
            PairMessage::Request { name, addrs, .. } => {
                check_name("device name", name)?;
                if addrs.len() > MAX_ADDRS {
                    return Err(format!("{} addresses", addrs.len()));
                }
                Ok(())
            }
            PairMessage::Accepted { name, folder } => {
                check_name("device name", name)?;
                check_folders(folder.as_slice())
            }
            PairMessage::Refused { .. } => Ok(()),
        }
    }
}

impl Bounded for SyncMessage {
    fn check(&self) -> Result<(), String> {
        match self {
            SyncMessage::Hello {
                name,
                folders,
                index,
                ..
            } => {
                check_name("device name", name)?;
                check_folders(folders)?;
                if index.len() > MAX_FOLDERS {
                    return Err(format!("{} index states", index.len()));
                }
                for s in index {
                    check_name("folder id", &s.folder)?;
                }
                Ok(())
            }
            SyncMessage::Folders { folders } => check_folders(folders),
        }
    }
}

impl Bounded for WireFile {
    fn check(&self) -> Result<(), String> {
        if self.path.len() > MAX_PATH {
            return Err(format!("a path of {} bytes", self.path.len()));
        }
        if self.kind > 2 {
            return Err(format!("file kind {}", self.kind));
        }
        if self.version.len() > MAX_VERSION_ENTRIES {
            return Err(format!("a version of {} entries", self.version.len()));
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(format!("{} chunk groups", self.groups.len()));
        }
        if let Some(t) = &self.symlink_target
            && t.len() > MAX_PATH
        {
            return Err(format!("a link target of {} bytes", t.len()));
        }
        let mut total: u64 = 0;
        for g in &self.groups {
            if g.chunks == 0 || g.chunks as usize > MAX_GROUP_CHUNKS {
                return Err(format!("a group of {} chunks", g.chunks));
            }
            // Every chunk holds 1 to MAX_CHUNK bytes: a size outside that
            // range is a claim no chunk list can back.
            if g.size < g.chunks as u64 || g.size > g.chunks as u64 * MAX_CHUNK as u64 {
                return Err(format!(
                    "a group of {} chunks claiming {} bytes",
                    g.chunks, g.size
                ));
            }
            total = total.saturating_add(g.size);
        }
        if self.kind == 0 && !self.deleted && total != self.size {
            return Err(format!(
                "groups of {total} bytes for a file of {} bytes",
                self.size
            ));
        }
        Ok(())
    }
}

fn check_path(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_PATH {
        return Err(format!("{what} of {} bytes", s.len()));
    }
    Ok(())
}

impl Bounded for WireVersion {
    fn check(&self) -> Result<(), String> {
        check_path("a path", &self.path)?;
        if self.kind > 2 {
            return Err(format!("file kind {}", self.kind));
        }
        if let Some(t) = &self.symlink_target {
            check_path("a link target", t)?;
        }
        if let Some(d) = &self.device {
            check_name("device name", d)?;
        }
        check_name("reason", &self.reason)
    }
}

impl Bounded for IndexMessage {
    fn check(&self) -> Result<(), String> {
        match self {
            IndexMessage::Update { folder, files, .. } => {
                check_name("folder id", folder)?;
                if files.len() > MAX_FILES_PER_UPDATE {
                    return Err(format!("{} files in one update", files.len()));
                }
                files.iter().try_for_each(Bounded::check)
            }
        }
    }
}

impl Bounded for Request {
    fn check(&self) -> Result<(), String> {
        match self {
            Request::Chunk {
                folder, path, size, ..
            } => {
                check_name("folder id", folder)?;
                if path.len() > MAX_PATH {
                    return Err(format!("a path of {} bytes", path.len()));
                }
                if *size > MAX_CHUNK {
                    return Err(format!("a chunk of {size} bytes"));
                }
                Ok(())
            }
            Request::Groups {
                folder,
                path,
                groups,
                ..
            } => {
                check_name("folder id", folder)?;
                if path.len() > MAX_PATH {
                    return Err(format!("a path of {} bytes", path.len()));
                }
                if groups.len() > MAX_GROUPS_PER_REQUEST {
                    return Err(format!("{} groups in one request", groups.len()));
                }
                Ok(())
            }
            Request::History { folder, path } => {
                check_name("folder id", folder)?;
                check_path("a path", path)
            }
            Request::VersionChunks { folder, .. } => check_name("folder id", folder),
            Request::VaultMissing { folder, ids } => {
                check_name("folder id", folder)?;
                if ids.len() > MAX_VAULT_IDS {
                    return Err(format!("{} ids in one request", ids.len()));
                }
                Ok(())
            }
            Request::VaultPutChunks { folder, chunks } => {
                check_name("folder id", folder)?;
                if chunks.len() > MAX_PUT_CHUNKS {
                    return Err(format!("{} chunks in one put", chunks.len()));
                }
                if let Some((_, n)) = chunks.iter().find(|(_, n)| *n > MAX_SEALED_CHUNK) {
                    return Err(format!("a sealed chunk of {n} bytes"));
                }
                let total: u64 = chunks.iter().map(|(_, n)| *n as u64).sum();
                if total > MAX_PUT_BYTES as u64 {
                    return Err(format!("a put of {total} bytes"));
                }
                Ok(())
            }
            Request::VaultPutRecords { folder, records } => {
                check_name("folder id", folder)?;
                if let Some((_, r)) = records.iter().find(|(_, r)| r.len() > MAX_INLINE_RECORD) {
                    return Err(format!("an inline record of {} bytes", r.len()));
                }
                Ok(())
            }
            Request::VaultPutRecord { folder, size, .. } => {
                check_name("folder id", folder)?;
                if *size > MAX_SEALED_RECORD {
                    return Err(format!("a sealed record of {size} bytes"));
                }
                Ok(())
            }
            Request::VaultRecords { folder, .. }
            | Request::VaultChunk { folder, .. }
            | Request::VaultRecord { folder, .. } => check_name("folder id", folder),
            Request::VaultList => Ok(()),
            Request::VaultChunkIds { folder, .. } => check_name("folder id", folder),
            Request::VaultDrop {
                folder,
                records,
                chunks,
            } => {
                check_name("folder id", folder)?;
                if records.len() > MAX_VAULT_IDS || chunks.len() > MAX_VAULT_IDS {
                    return Err(format!(
                        "{} records and {} chunks in one drop",
                        records.len(),
                        chunks.len()
                    ));
                }
                Ok(())
            }
        }
    }
}

impl Bounded for Reply {
    fn check(&self) -> Result<(), String> {
        match self {
            Reply::Chunk { size } if *size > MAX_CHUNK => Err(format!("a chunk of {size} bytes")),
            Reply::Chunk { .. } => Ok(()),
            Reply::VaultBytes { size } if *size > MAX_SEALED_RECORD => {
                Err(format!("sealed bytes of {size} bytes"))
            }
            Reply::VaultBytes { .. } | Reply::VaultStored => Ok(()),
            Reply::VaultRecords { records, large, .. } => {
                if let Some((_, r)) = records.iter().find(|(_, r)| r.len() > MAX_INLINE_RECORD) {
                    return Err(format!("an inline record of {} bytes", r.len()));
                }
                if large.len() > MAX_LARGE_PER_PAGE {
                    return Err(format!("{} large records in one page", large.len()));
                }
                Ok(())
            }
            Reply::VaultMissing { missing } => {
                if missing.len() > MAX_VAULT_IDS {
                    return Err(format!("{} ids in one reply", missing.len()));
                }
                Ok(())
            }
            Reply::VaultIds { ids, .. } => {
                if ids.len() > MAX_VAULT_IDS {
                    return Err(format!("{} ids in one reply", ids.len()));
                }
                Ok(())
            }
            Reply::Vaults { vaults } => {
                if vaults.len() > MAX_FOLDERS {
                    return Err(format!("{} vaults", vaults.len()));
                }
                vaults.iter().try_for_each(|(id, label)| {
                    check_name("folder id", id)?;
                    check_name("folder label", label)
                })
            }
            Reply::Groups { groups } => {
                if groups.len() > MAX_GROUPS_PER_REQUEST {
                    return Err(format!("{} groups in one reply", groups.len()));
                }
                if groups.iter().any(|g| g.len() > MAX_GROUP_CHUNKS) {
                    return Err("a group of too many chunks".into());
                }
                if let Some(c) = groups
                    .iter()
                    .flatten()
                    .find(|c| c.size == 0 || c.size > MAX_CHUNK)
                {
                    return Err(format!("a chunk of {} bytes", c.size));
                }
                Ok(())
            }
            Reply::Unavailable { reason } => check_name("reason", reason),
            Reply::History { versions, .. } => {
                if versions.len() > MAX_VERSIONS_PER_REPLY {
                    return Err(format!("{} versions in one reply", versions.len()));
                }
                versions.iter().try_for_each(Bounded::check)
            }
            Reply::Chunks { chunks, .. } => {
                if chunks.len() > MAX_CHUNKS_PER_REPLY {
                    return Err(format!("{} chunks in one reply", chunks.len()));
                }
                if let Some(c) = chunks.iter().find(|c| c.size == 0 || c.size > MAX_CHUNK) {
                    return Err(format!("a chunk of {} bytes", c.size));
                }
                Ok(())
            }
        }
    }
}

/// Encodes one message as a frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let payload = postcard::to_stdvec(msg).expect("messages always serialize");
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// Decodes a frame payload (without its length prefix) and checks its limits.
pub fn decode<T: DeserializeOwned + Bounded>(payload: &[u8]) -> Result<T, ProtocolError> {
    if payload.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(payload.len()));
    }
    let (msg, rest): (T, &[u8]) =
        postcard::take_from_bytes(payload).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    msg.check().map_err(ProtocolError::Malformed)?;
    Ok(msg)
}

/// Writes one message.
pub async fn write_msg<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), ProtocolError> {
    w.write_all(&encode(msg)).await?;
    Ok(())
}

/// Reads one message; `Ok(None)` if the stream ended cleanly before a frame.
pub async fn read_msg<T: DeserializeOwned + Bounded>(
    r: &mut (impl AsyncRead + Unpin),
) -> Result<Option<T>, ProtocolError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ProtocolError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    // Grown as bytes arrive, so a peer that announces a large frame and
    // stalls holds no more memory than it sent.
    let mut payload = Vec::with_capacity(len.min(64 * 1024));
    let got = r.take(len as u64).read_to_end(&mut payload).await?;
    if got < len {
        return Err(ProtocolError::Truncated);
    }
    decode(&payload).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> SyncMessage {
        SyncMessage::Hello {
            version: PROTOCOL_VERSION,
            name: "laptop".into(),
            folders: vec![FolderOffer {
                id: "docs".into(),
                label: "Documents".into(),
                encrypted: true,
                secret: None,
            }],
            index: vec![IndexState {
                folder: "docs".into(),
                epoch: 7,
                sequence: 42,
            }],
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let mut buf = encode(&hello());
        buf.extend(encode(&SyncMessage::Folders { folders: vec![] }));
        let mut r = &buf[..];
        assert_eq!(
            read_msg::<SyncMessage>(&mut r).await.unwrap(),
            Some(hello())
        );
        assert_eq!(
            read_msg::<SyncMessage>(&mut r).await.unwrap(),
            Some(SyncMessage::Folders { folders: vec![] })
        );
        assert_eq!(read_msg::<SyncMessage>(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_truncated_and_garbage_frames_are_refused() {
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let err = read_msg::<SyncMessage>(&mut &huge[..]).await.unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge(_)), "{err}");

        let frame = encode(&hello());
        let err = read_msg::<SyncMessage>(&mut &frame[..frame.len() - 1])
            .await
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Truncated), "{err}");

        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend([0xff, 0xff, 0xff]);
        let err = read_msg::<SyncMessage>(&mut &garbage[..])
            .await
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
    }

    #[test]
    fn over_long_fields_are_refused_after_decoding() {
        let msg = SyncMessage::Hello {
            version: 1,
            name: "x".repeat(MAX_NAME + 1),
            folders: vec![],
            index: vec![],
        };
        let frame = encode(&msg);
        let err = decode::<SyncMessage>(&frame[4..]).unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
    }

    fn record(groups: Vec<WireGroup>) -> WireFile {
        WireFile {
            path: "a".into(),
            kind: 0,
            size: groups.iter().map(|g| g.size).sum(),
            mtime_ns: 1,
            permissions: 0o644,
            hash: Some([1; 32]),
            symlink_target: None,
            deleted: false,
            version: vec![(1, 1)],
            modified_by: 1,
            sequence: 1,
            groups,
        }
    }

    #[test]
    fn records_claiming_sizes_their_chunks_cannot_hold_are_refused() {
        let group = |chunks: u32, size: u64| WireGroup {
            hash: [0; 32],
            chunks,
            size,
        };
        assert!(record(vec![group(2, 2 * MAX_CHUNK as u64)]).check().is_ok());
        for bad in [
            // 2^62 bytes in one group of one chunk.
            vec![group(1, 1 << 62)],
            // Over the chunk maximum on average.
            vec![group(4, 4 * MAX_CHUNK as u64 + 1)],
            // Fewer bytes than chunks.
            vec![group(8, 7)],
            // More chunks per group than allowed.
            vec![group(MAX_GROUP_CHUNKS as u32 + 1, 1 << 30)],
        ] {
            let r = record(bad);
            let err = decode::<IndexMessage>(
                &encode(&IndexMessage::Update {
                    folder: "docs".into(),
                    epoch: 1,
                    sequence: 1,
                    files: vec![r.clone()],
                })[4..],
            )
            .unwrap_err();
            assert!(matches!(err, ProtocolError::Malformed(_)), "{r:?}: {err}");
        }
        // Sizes that do not add up to the file's.
        let mut r = record(vec![group(1, 10)]);
        r.size = 1 << 62;
        assert!(r.check().is_err());
        // A group list over the limit.
        assert!(record(vec![group(1, 1); MAX_GROUPS + 1]).check().is_err());
    }

    #[test]
    fn group_replies_with_chunks_over_the_maximum_are_refused() {
        let chunk = |size| WireChunk {
            hash: [0; 32],
            size,
        };
        for size in [0, MAX_CHUNK + 1, u32::MAX] {
            let m = Reply::Groups {
                groups: vec![vec![chunk(1), chunk(size)]],
            };
            assert!(decode::<Reply>(&encode(&m)[4..]).is_err(), "{size}");
        }
        let m = Reply::Groups {
            groups: vec![vec![chunk(MAX_CHUNK)]],
        };
        assert_eq!(decode::<Reply>(&encode(&m)[4..]).unwrap(), m);
    }

    #[tokio::test]
    async fn a_frame_announcing_more_than_it_sends_holds_only_what_came() {
        // Claims the largest frame, sends 3 bytes, ends: refused as
        // truncated (the reader grew its buffer only by what arrived).
        let mut bytes = (MAX_FRAME as u32).to_be_bytes().to_vec();
        bytes.extend([1, 2, 3]);
        let err = read_msg::<SyncMessage>(&mut &bytes[..]).await.unwrap_err();
        assert!(matches!(err, ProtocolError::Truncated), "{err}");
        // A 4 GB claim is refused from its length alone.
        let huge = u32::MAX.to_be_bytes();
        let err = read_msg::<Request>(&mut &huge[..]).await.unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge(_)), "{err}");
    }

    #[test]
    fn revision_1_requests_and_replies_decode_unchanged() {
        // Bytes a revision-1 ferry sends (the seeds in fuzz/corpus/wire_messages).
        let mut chunk = vec![0, 4, b'd', b'o', b'c', b's', 1, b'a', 0, 0x80, 0x80, 4];
        chunk.extend([3u8; 32]);
        assert_eq!(
            decode::<Request>(&chunk).unwrap(),
            Request::Chunk {
                folder: "docs".into(),
                path: "a".into(),
                offset: 0,
                size: 65536,
                hash: [3; 32],
            }
        );
        let unavailable = [2, 4, b'g', b'o', b'n', b'e'];
        assert_eq!(
            decode::<Reply>(&unavailable).unwrap(),
            Reply::Unavailable {
                reason: "gone".into()
            }
        );
        assert_eq!(decode::<Reply>(&[0, 9]).unwrap(), Reply::Chunk { size: 9 });
    }

    fn version(path: &str) -> WireVersion {
        WireVersion {
            id: 7,
            path: path.into(),
            kind: 0,
            size: 3,
            mtime_ns: -5,
            permissions: 0o644,
            hash: Some([1; 32]),
            symlink_target: None,
            modified_by: 42,
            device: Some("laptop".into()),
            superseded_at: 1_700_000_000,
            reason: "replaced".into(),
        }
    }

    #[test]
    fn history_messages_round_trip_within_their_limits() {
        let msgs = [
            Reply::History {
                versions: vec![version("a/b.txt")],
                truncated: true,
            },
            Reply::Chunks {
                chunks: vec![WireChunk {
                    hash: [2; 32],
                    size: 3,
                }],
                more: false,
            },
        ];
        for m in msgs {
            assert_eq!(decode::<Reply>(&encode(&m)[4..]).unwrap(), m);
        }
        let reqs = [
            Request::History {
                folder: "docs".into(),
                path: String::new(),
            },
            Request::VersionChunks {
                folder: "docs".into(),
                id: 7,
                start: 16_384,
            },
        ];
        for r in reqs {
            assert_eq!(decode::<Request>(&encode(&r)[4..]).unwrap(), r);
        }
    }

    #[test]
    fn over_long_history_fields_are_refused() {
        let refused = |m: Reply| {
            let err = decode::<Reply>(&encode(&m)[4..]).unwrap_err();
            assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
        };
        refused(Reply::History {
            versions: vec![version(&"x".repeat(MAX_PATH + 1))],
            truncated: false,
        });
        let mut v = version("a");
        v.kind = 3;
        refused(Reply::History {
            versions: vec![v],
            truncated: false,
        });
        let mut v = version("a");
        v.reason = "r".repeat(MAX_NAME + 1);
        refused(Reply::History {
            versions: vec![v],
            truncated: false,
        });
        refused(Reply::Chunks {
            chunks: vec![
                WireChunk {
                    hash: [0; 32],
                    size: 1
                };
                MAX_CHUNKS_PER_REPLY + 1
            ],
            more: true,
        });
        refused(Reply::Chunks {
            chunks: vec![WireChunk {
                hash: [0; 32],
                size: MAX_CHUNK + 1,
            }],
            more: false,
        });
        let r = Request::History {
            folder: "docs".into(),
            path: "p".repeat(MAX_PATH + 1),
        };
        assert!(decode::<Request>(&encode(&r)[4..]).is_err());
    }
}
