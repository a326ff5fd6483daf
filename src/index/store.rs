//! Index queries for the history's chunk store: which pack holds each chunk, and
//! the transactions that add, repoint and drop them (see `history::store`).

use std::collections::HashSet;

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{Index, IndexError, Result, now_secs};
use crate::chunking::ChunkHash;

/// A chunk's entry in a pack, as the index records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChunk {
    /// The chunk's blake3 hash.
    pub hash: ChunkHash,
    /// Byte offset of its entry (the 36-byte entry header) in the pack.
    pub offset: u64,
    /// Bytes of chunk data.
    pub length: u32,
}

/// Where a chunk is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    /// Row id of the pack.
    pub pack: i64,
    /// The pack's name (32 hex characters).
    pub pack_name: String,
    /// Byte offset of the chunk's entry in the pack.
    pub offset: u64,
    /// Bytes of chunk data.
    pub length: u32,
}

/// A pack row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackRow {
    /// Row id.
    pub id: i64,
    /// The pack's name (32 hex characters).
    pub name: String,
    /// File size in bytes.
    pub size: u64,
}

/// A pack and how much of it is still pointed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackUsage {
    /// The pack.
    pub pack: PackRow,
    /// Chunks whose row points into it.
    pub live_chunks: u64,
    /// Their data bytes.
    pub live_bytes: u64,
}

/// What dropping unreferenced chunks removed from the index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DroppedChunks {
    /// Chunk rows deleted.
    pub chunks: u64,
    /// Their data bytes.
    pub bytes: u64,
    /// Packs left without chunks, whose rows were deleted too (their files are
    /// the caller's to remove).
    pub empty_packs: Vec<PackRow>,
}

/// Totals of the chunk store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreTotals {
    /// Pack rows.
    pub packs: u64,
    /// Chunk rows.
    pub chunks: u64,
    /// Data bytes of those chunks (each stored once).
    pub chunk_bytes: u64,
    /// Sum of the pack file sizes, dead entries included.
    pub pack_bytes: u64,
}

fn chunk_hash(bytes: &[u8]) -> Result<ChunkHash> {
    ChunkHash::from_slice(bytes).ok_or_else(|| IndexError::Corrupt("chunk hash length".into()))
}

fn stored_chunk(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Vec<u8>, i64, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

fn to_stored((hash, offset, length): (Vec<u8>, i64, i64)) -> Result<StoredChunk> {
    Ok(StoredChunk {
        hash: chunk_hash(&hash)?,
        offset: u64::try_from(offset)
            .map_err(|_| IndexError::Corrupt(format!("chunk offset {offset}")))?,
        length: u32::try_from(length)
            .map_err(|_| IndexError::Corrupt(format!("chunk length {length}")))?,
    })
}

impl Index {
    /// Whether the store holds a chunk.
    pub fn store_contains(&self, hash: &ChunkHash) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM store_chunks WHERE hash = ?1")?
            .query_row([&hash.0[..]], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Where the store holds a chunk, if it does.
    pub fn store_locate(&self, hash: &ChunkHash) -> Result<Option<ChunkLocation>> {
        let row: Option<(i64, String, i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT c.pack, p.name, c.offset, c.length
                 FROM store_chunks c JOIN store_packs p ON p.id = c.pack WHERE c.hash = ?1",
            )?
            .query_row([&hash.0[..]], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        row.map(|(pack, pack_name, offset, length)| {
            let c = to_stored((hash.0.to_vec(), offset, length))?;
            Ok(ChunkLocation {
                pack,
                pack_name,
                offset: c.offset,
                length: c.length,
            })
        })
        .transpose()
    }

    /// Records a pack that is complete and fsynced in place, and its chunks, in
    /// one transaction. A chunk another writer recorded first keeps its place.
    /// Returns the pack's row id.
    pub fn store_add_pack(&mut self, name: &str, size: u64, chunks: &[StoredChunk]) -> Result<i64> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let pack = add_pack_in(&tx, name, size, chunks)?;
        tx.commit()?;
        Ok(pack)
    }

    /// The names of every pack the index knows.
    pub fn store_pack_names(&self) -> Result<HashSet<String>> {
        let mut stmt = self.conn.prepare("SELECT name FROM store_packs")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every pack, by row id.
    pub fn store_packs(&self) -> Result<Vec<PackRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, size FROM store_packs ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(PackRow {
                id: r.get(0)?,
                name: r.get(1)?,
                size: r.get::<_, i64>(2)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The chunks recorded in a pack, by offset.
    pub fn store_pack_chunks(&self, pack: i64) -> Result<Vec<StoredChunk>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT hash, offset, length FROM store_chunks WHERE pack = ?1 ORDER BY offset",
        )?;
        let rows = stmt.query_map([pack], stored_chunk)?;
        rows.map(|r| to_stored(r?)).collect()
    }

    /// Every pack with the number and bytes of chunks still pointing into it.
    pub fn store_pack_usage(&self) -> Result<Vec<PackUsage>> {
        let mut stmt = self.conn.prepare(
            "SELECT p.id, p.name, p.size, COUNT(c.hash), COALESCE(SUM(c.length), 0)
             FROM store_packs p LEFT JOIN store_chunks c ON c.pack = p.id
             GROUP BY p.id ORDER BY p.id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(PackUsage {
                pack: PackRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                },
                live_chunks: r.get::<_, i64>(3)? as u64,
                live_bytes: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes the rows of chunks no `history_chunks` row refers to (nor a
    /// vault's sealed chunk, nor a live file of a folder that keeps local
    /// versions: those chunks were captured so that the version can be kept
    /// when a local edit replaces it), and of packs left without chunks, in
    /// one transaction that is durable before it returns (the caller deletes
    /// files next).
    pub fn store_drop_unreferenced(&mut self) -> Result<DroppedChunks> {
        let local: Vec<String> = self
            .local_history_folders()?
            .iter()
            .map(i64::to_string)
            .collect();
        let kept = "NOT EXISTS (SELECT 1 FROM history_chunks h WHERE h.hash = store_chunks.hash)
             AND NOT EXISTS (SELECT 1 FROM vault_stored v WHERE v.hash = store_chunks.hash)";
        let unreferenced = if local.is_empty() {
            kept.to_owned()
        } else {
            format!(
                "{kept}
                 AND NOT EXISTS (SELECT 1 FROM chunks c JOIN files f ON f.id = c.file
                     WHERE c.hash = store_chunks.hash AND f.folder IN ({}))",
                local.join(", ")
            )
        };
        self.durably(|tx| {
            let unreferenced = unreferenced.as_str();
            let (chunks, bytes): (i64, i64) = tx.query_row(
                &format!(
                    "SELECT COUNT(*), COALESCE(SUM(length), 0) FROM store_chunks
                     WHERE {unreferenced}"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            tx.execute(
                &format!("DELETE FROM store_chunks WHERE {unreferenced}"),
                [],
            )?;
            let empty_packs = {
                let mut stmt = tx.prepare(
                    "DELETE FROM store_packs WHERE NOT EXISTS
                         (SELECT 1 FROM store_chunks c WHERE c.pack = store_packs.id)
                     RETURNING id, name, size",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok(PackRow {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        size: r.get::<_, i64>(2)? as u64,
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            Ok(DroppedChunks {
                chunks: chunks as u64,
                bytes: bytes as u64,
                empty_packs,
            })
        })
    }

    /// Records a pack the GC wrote (complete and fsynced in place), points the
    /// chunks it copied there, and deletes the rows of `drained` packs (which
    /// must have no chunks left), in one transaction that is durable before it
    /// returns (the caller deletes the drained files next). Returns the new
    /// pack's row id.
    pub fn store_move_chunks(
        &mut self,
        name: &str,
        size: u64,
        moved: &[StoredChunk],
        drained: &[i64],
    ) -> Result<i64> {
        self.durably(|tx| {
            tx.execute(
                "INSERT INTO store_packs (name, size, created_at) VALUES (?1, ?2, ?3)",
                params![name, size as i64, now_secs()],
            )?;
            let pack = tx.last_insert_rowid();
            let mut repoint = tx.prepare_cached(
                "UPDATE store_chunks SET pack = ?2, offset = ?3 WHERE hash = ?1 AND length = ?4",
            )?;
            for c in moved {
                let n = repoint.execute(params![&c.hash.0[..], pack, c.offset as i64, c.length])?;
                if n != 1 {
                    return Err(IndexError::Corrupt(format!(
                        "chunk {} vanished while being moved",
                        c.hash
                    )));
                }
            }
            let mut drop_pack = tx.prepare_cached("DELETE FROM store_packs WHERE id = ?1")?;
            for id in drained {
                drop_pack.execute([id])?;
            }
            Ok(pack)
        })
    }

    /// Distinct hashes in `history_chunks` that the store does not hold.
    pub fn store_unstored_history_chunks(&self) -> Result<Vec<ChunkHash>> {
        let mut stmt = self.conn.prepare(
            "SELECT DISTINCT h.hash FROM history_chunks h WHERE NOT EXISTS
                 (SELECT 1 FROM store_chunks s WHERE s.hash = h.hash)
             ORDER BY h.hash",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        rows.map(|r| chunk_hash(&r?)).collect()
    }

    /// Totals of the chunk store.
    pub fn store_totals(&self) -> Result<StoreTotals> {
        let (packs, pack_bytes): (i64, i64) = self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM store_packs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let (chunks, chunk_bytes): (i64, i64) = self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(length), 0) FROM store_chunks",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(StoreTotals {
            packs: packs as u64,
            chunks: chunks as u64,
            chunk_bytes: chunk_bytes as u64,
            pack_bytes: pack_bytes as u64,
        })
    }

    /// Runs `f` in an immediate transaction whose commit is fsynced (WAL with
    /// `synchronous = FULL`), for commits that files are deleted after: with the
    /// usual `NORMAL` a power cut could undo the commit but not the deletes.
    pub(super) fn durably<R>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<R>,
    ) -> Result<R> {
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        let result = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => f(&tx).and_then(|r| {
                tx.commit()?;
                Ok(r)
            }),
            Err(e) => Err(e.into()),
        };
        let restored = self.conn.pragma_update(None, "synchronous", "NORMAL");
        let r = result?;
        restored?;
        Ok(r)
    }

    /// The connection, for tests that set up rows no API writes yet.
    #[cfg(test)]
    pub(crate) fn conn_for_tests(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

/// Inserts a pack's row and its chunks' rows (a chunk recorded already keeps
/// its place) in `tx`; returns the pack's row id.
pub(super) fn add_pack_in(
    tx: &rusqlite::Transaction<'_>,
    name: &str,
    size: u64,
    chunks: &[StoredChunk],
) -> Result<i64> {
    tx.execute(
        "INSERT INTO store_packs (name, size, created_at) VALUES (?1, ?2, ?3)",
        params![name, size as i64, now_secs()],
    )?;
    let pack = tx.last_insert_rowid();
    let mut add = tx.prepare_cached(
        "INSERT OR IGNORE INTO store_chunks (hash, pack, offset, length)
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    for c in chunks {
        add.execute(params![&c.hash.0[..], pack, c.offset as i64, c.length])?;
    }
    Ok(pack)
}
