//! The vault: what an untrusted backup holder stores for a folder, sealed chunks
//! and sealed records, and the keys that seal them. A cryptographic layer only:
//! no I/O, no networking; the sync layer wraps chunk and record storage with it.
//!
//! # Threat model
//!
//! The holder stores and serves the bytes but never receives the folder secret.
//! It learns: how many chunks and records there are, each one's size rounded to
//! its padding bucket (see [`padded_len`]), when they are written and read, which
//! record ids are replaced together, and the folder id. It does not learn file
//! names, directory structure, contents, exact sizes, or which records are
//! history versions of which file; chunk ids are keyed hashes, so it cannot test
//! whether it holds a known file by hashing it. The sizes of content-defined
//! chunks, rounded to 4 KiB, remain a weak fingerprint of a large known file
//! (ferry's chunker is not keyed, unlike borg's). Anything it changes, cuts,
//! swaps, moves to another id, or moves between folders is refused with a
//! [`VaultError`] saying which; a record older than the caller has seen is
//! refused as a rollback. Rollback of a whole folder to an older consistent state
//! (including serving nothing newer) is only caught against revisions the caller
//! remembers: on recovery from scratch there are none.
//!
//! # Format, version 1
//!
//! Chunks and records share one layout:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format version, `1` ([`FORMAT_VERSION`]) |
//! | 4 | key check: the first 4 bytes of the folder secret's key-check key ([`keys`]) |
//! | 4 | folder tag: the first 4 bytes of blake3 derive-key (context `ferry 2026 vault folder-tag v1`) over the folder id |
//! | 32 | the item's id, [`ChunkId`] or [`RecordId`] |
//! | 24 | random XChaCha20 nonce |
//! | n | ciphertext of the padded plaintext |
//! | 16 | Poly1305 tag |
//!
//! The associated data is the 65-byte header then the folder id's bytes, so the
//! version, id and folder are all authenticated. Chunks are sealed with the
//! chunk-seal key, records with the record-seal key. The plaintext is padded with
//! one `0x80` byte and zeros to [`padded_len`]. A chunk's plaintext is its bytes,
//! and its id is blake3 keyed with the chunk-id key over its plaintext blake3
//! hash. A record's plaintext is the postcard encoding of [`VaultRecord`]'s
//! fields in order (path as a string, kind as 0 file / 1 dir / 2 symlink, the
//! version vector in its stored form, chunks as (hash, length) pairs); its id is
//! blake3 keyed with the record-id key over `0x00 || path` for the current
//! record, or `0x01 || revision (u64 big-endian) || path` for a history version.
//!
//! The key check and folder tag let a wrong recovery code or a mixed-up folder be
//! told apart from tampering; both are constant per folder, which the holder
//! knows anyway.

pub mod keys;
pub mod seal;

pub use keys::{ChunkId, FolderSecret, RecordId, RecoveryCodeError, VaultKeys};
pub use seal::{
    FORMAT_VERSION, HolderError, Item, RecordKind, SealedChunk, SealedRecord, VaultError,
    VaultRecord, open_chunk, open_record, padded_len, seal_chunk, seal_record,
};
