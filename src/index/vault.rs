//! Index queries about encrypted backup holders: on a folder's own devices,
//! which devices hold it sealed and how far each has been sent; on a holder,
//! the vaults it keeps for others (sealed chunks and records it cannot read).

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::devices::device_id;
use super::store::add_pack_in;
use super::{ChunkLocation, Index, IndexError, Result, StoredChunk, now_secs};
use crate::chunking::ChunkHash;
use crate::device::DeviceId;
use crate::folder::FolderId;

/// A vault this device holds for another device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultInfo {
    /// Row id.
    pub row: i64,
    /// The folder id (the only plaintext the holder has).
    pub folder_id: String,
    /// The device that shared it and may write to it.
    pub owner: DeviceId,
    /// The owner's label for it.
    pub label: String,
    /// Sealed chunks stored, and their bytes.
    pub chunks: u64,
    /// Bytes of sealed chunks.
    pub chunk_bytes: u64,
    /// Sealed records stored.
    pub records: u64,
    /// Bytes of sealed records.
    pub record_bytes: u64,
}

/// How far a holder has been sent a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HolderState {
    /// Highest local sequence whose records the holder has.
    pub pushed: i64,
    /// Highest history row id whose version the holder has.
    pub history: i64,
    /// Last record revision used.
    pub revision: u64,
}

/// How much one page of [`Index::vault_records`] carries.
#[derive(Debug, Clone, Copy)]
pub struct RecordPage {
    /// About this many bytes of records.
    pub max_bytes: usize,
    /// Records larger than this are listed by id only.
    pub inline: usize,
    /// At most this many of those.
    pub max_large: usize,
}

/// A sealed chunk or record under its keyed id.
pub type SealedEntry = ([u8; 32], Vec<u8>);

/// A sealed chunk held as a blob in the index (before migration 12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyChunk {
    /// Its `vault_chunks` row.
    pub row: i64,
    /// The vault's row.
    pub vault: i64,
    /// Its keyed id.
    pub id: [u8; 32],
    /// The sealed bytes.
    pub bytes: Vec<u8>,
}

/// A folder as offered between devices (see `protocol::FolderOffer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered {
    /// The folder id.
    pub id: String,
    /// The offering device's label.
    pub label: String,
    /// To hold encrypted (no secret then).
    pub encrypted: bool,
    /// The folder's vault secret, offered to trusted devices only.
    pub secret: Option<crate::vault::FolderSecret>,
}

/// A [`HolderState`] from columns `first..first + 3` (pushed, history, revision).
fn holder_state(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<HolderState> {
    Ok(HolderState {
        pushed: r.get(first)?,
        history: r.get(first + 1)?,
        revision: r.get::<_, i64>(first + 2)? as u64,
    })
}

impl Index {
    /// Makes `device` a holder of `folder` (sealed). Returns whether it is new.
    pub fn add_vault_holder(&self, folder: &FolderId, device: &DeviceId) -> Result<bool> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO vault_holders (folder, device)
             SELECT f.id, d.id FROM folders f, devices d
             WHERE f.folder_id = ?1 AND d.device_id = ?2 AND d.is_local = 0",
            params![folder.as_str(), device.to_string()],
        )?;
        if n == 0 && !self.is_vault_holder(folder, device)? {
            return Err(IndexError::Duplicate(format!(
                "cannot share {folder} with {device}: unknown folder or device"
            )));
        }
        Ok(n > 0)
    }

    /// Whether `device` holds `folder` sealed for this device.
    pub fn is_vault_holder(&self, folder: &FolderId, device: &DeviceId) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM vault_holders vh
               JOIN folders f ON f.id = vh.folder JOIN devices d ON d.id = vh.device
               WHERE f.folder_id = ?1 AND d.device_id = ?2)",
            params![folder.as_str(), device.to_string()],
            |r| r.get(0),
        )?)
    }

    /// The devices holding `folder` sealed.
    pub fn vault_holders(&self, folder: i64) -> Result<Vec<(DeviceId, HolderState)>> {
        let mut stmt = self.conn.prepare(
            "SELECT d.device_id, vh.pushed, vh.history, vh.revision FROM vault_holders vh
             JOIN devices d ON d.id = vh.device WHERE vh.folder = ?1 ORDER BY d.device_id",
        )?;
        let rows = stmt.query_map([folder], |r| {
            Ok((r.get::<_, String>(0)?, holder_state(r, 1)?))
        })?;
        rows.map(|row| {
            let (d, state) = row?;
            Ok((device_id(&d)?, state))
        })
        .collect()
    }

    /// How far `device` has been sent `folder`.
    pub fn holder_state(&self, folder: i64, device: &DeviceId) -> Result<Option<HolderState>> {
        Ok(self
            .conn
            .query_row(
                "SELECT vh.pushed, vh.history, vh.revision FROM vault_holders vh
                 JOIN devices d ON d.id = vh.device
                 WHERE vh.folder = ?1 AND d.device_id = ?2",
                params![folder, device.to_string()],
                |r| holder_state(r, 0),
            )
            .optional()?)
    }

    /// Records that `device` has everything of `folder` up to `state`.
    pub fn set_holder_state(
        &self,
        folder: i64,
        device: &DeviceId,
        state: HolderState,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE vault_holders SET pushed = ?3, history = ?4, revision = ?5
             WHERE folder = ?1 AND device = (SELECT id FROM devices WHERE device_id = ?2)",
            params![
                folder,
                device.to_string(),
                state.pushed,
                state.history,
                state.revision as i64
            ],
        )?;
        Ok(())
    }

    /// Everything this device offers `device` in a hello: the folders shared
    /// with it, the folders it holds sealed for this device, and the vaults
    /// this device holds for it (which tells it they are accepted).
    pub fn offers_to(&self, device: &DeviceId) -> Result<Vec<Offered>> {
        let mut stmt = self.conn.prepare(
            "SELECT f.folder_id, f.label, 0, s.secret FROM folder_devices fd
               JOIN folders f ON f.id = fd.folder JOIN devices d ON d.id = fd.device
               LEFT JOIN folder_secrets s ON s.folder = f.id
               WHERE d.device_id = ?1
             UNION ALL
             SELECT f.folder_id, f.label, 1, NULL FROM vault_holders vh
               JOIN folders f ON f.id = vh.folder JOIN devices d ON d.id = vh.device
               WHERE d.device_id = ?1
             UNION ALL
             SELECT v.folder_id, v.label, 1, NULL FROM vaults v JOIN devices d ON d.id = v.owner
               WHERE d.device_id = ?1
             ORDER BY 1",
        )?;
        let rows = stmt.query_map([device.to_string()], |r| {
            let secret: Option<Vec<u8>> = r.get(3)?;
            Ok(Offered {
                id: r.get(0)?,
                label: r.get(1)?,
                encrypted: r.get::<_, i64>(2)? == 1,
                secret: secret
                    .and_then(|s| <[u8; 32]>::try_from(s).ok())
                    .map(crate::vault::FolderSecret::from_bytes),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Takes a trusted peer's secret for a folder both devices have, when it
    /// differs: every device of a folder must seal with the same one. The
    /// smaller of the two wins, so both sides settle on the same secret
    /// whoever hears first; but a device that has already sealed the folder
    /// for a holder keeps its own (the holder's copy would become unreadable).
    /// Returns whether this device's secret changed.
    pub fn reconcile_secret(
        &mut self,
        folder_id: &str,
        offered: &crate::vault::FolderSecret,
    ) -> Result<bool> {
        let Some(row) = self
            .conn
            .query_row(
                "SELECT id FROM folders WHERE folder_id = ?1",
                [folder_id],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
        else {
            return Ok(false);
        };
        let mine = self.folder_secret(row)?;
        if mine.as_bytes()[..] <= offered.as_bytes()[..] {
            return Ok(false);
        }
        if !self.vault_holders(row)?.is_empty() {
            tracing::warn!(
                folder = folder_id,
                "a peer seals this folder with another key; keeping this device's, which its backup holders use"
            );
            return Ok(false);
        }
        self.set_folder_secret(row, offered)?;
        Ok(true)
    }

    /// Makes a vault for `folder_id`, shared by `owner`. Returns its row.
    pub fn add_vault(&self, folder_id: &str, owner: &DeviceId, label: &str) -> Result<i64> {
        let have: bool = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM folders WHERE folder_id = ?1)
                 OR EXISTS (SELECT 1 FROM vaults WHERE folder_id = ?1)",
            [folder_id],
            |r| r.get(0),
        )?;
        if have {
            return Err(IndexError::Duplicate(format!(
                "this device already has a folder or vault with id {folder_id}"
            )));
        }
        let n = self.conn.execute(
            "INSERT INTO vaults (folder_id, owner, label, created_at)
             SELECT ?1, id, ?3, ?4 FROM devices WHERE device_id = ?2 AND is_local = 0",
            params![folder_id, owner.to_string(), label, now_secs()],
        )?;
        if n == 0 {
            return Err(IndexError::Duplicate(format!(
                "cannot hold {folder_id} for {owner}: not a paired device"
            )));
        }
        Ok(self.conn.last_insert_rowid())
    }

    /// The vaults this device holds, with what they contain.
    pub fn vaults(&self) -> Result<Vec<VaultInfo>> {
        let mut stmt = self.conn.prepare(
            "SELECT v.id, v.folder_id, d.device_id, v.label,
                    (SELECT count(*) FROM vault_stored WHERE vault = v.id),
                    (SELECT coalesce(sum(length), 0) FROM vault_stored WHERE vault = v.id),
                    (SELECT count(*) FROM vault_records WHERE vault = v.id),
                    (SELECT coalesce(sum(length(bytes)), 0) FROM vault_records WHERE vault = v.id)
             FROM vaults v JOIN devices d ON d.id = v.owner ORDER BY v.folder_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                [
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                ],
            ))
        })?;
        rows.map(|row| {
            let (row, folder_id, owner, label, n) = row?;
            Ok(VaultInfo {
                row,
                folder_id,
                owner: device_id(&owner)?,
                label,
                chunks: n[0] as u64,
                chunk_bytes: n[1] as u64,
                records: n[2] as u64,
                record_bytes: n[3] as u64,
            })
        })
        .collect()
    }

    /// The vault for `folder_id`: its row and owner.
    pub fn vault(&self, folder_id: &str) -> Result<Option<(i64, DeviceId)>> {
        let row = self
            .conn
            .query_row(
                "SELECT v.id, d.device_id FROM vaults v JOIN devices d ON d.id = v.owner
                 WHERE v.folder_id = ?1",
                [folder_id],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()?;
        row.map(|(id, d)| Ok((id, device_id(&d)?))).transpose()
    }

    /// Which of `ids` the vault lacks, as indexes into `ids`.
    pub fn vault_missing(&self, vault: i64, ids: &[[u8; 32]]) -> Result<Vec<u32>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM vault_stored WHERE vault = ?1 AND chunk = ?2)",
        )?;
        let mut out = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let have: bool = stmt.query_row(params![vault, &id[..]], |r| r.get(0))?;
            if !have {
                out.push(i as u32);
            }
        }
        Ok(out)
    }

    /// Records a pack of sealed chunks that is complete and fsynced in the
    /// chunk store (see `ChunkStore::write_pack`), and the vault rows naming
    /// them, in one transaction: `owners[i]` (vault row, keyed chunk id) is the
    /// chunk of `entries[i]`. A chunk a vault holds already keeps its bytes.
    /// `legacy` lists `vault_chunks` rows whose bytes this pack now holds
    /// (moved out of the index), deleted in the same transaction.
    pub fn vault_add_pack(
        &mut self,
        name: &str,
        size: u64,
        entries: &[StoredChunk],
        owners: &[(i64, [u8; 32])],
        legacy: &[i64],
    ) -> Result<()> {
        if entries.len() != owners.len() {
            return Err(IndexError::Corrupt(format!(
                "a vault pack of {} chunks for {} ids",
                entries.len(),
                owners.len()
            )));
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        add_pack_in(&tx, name, size, entries)?;
        {
            let mut add = tx.prepare_cached(
                "INSERT OR IGNORE INTO vault_stored (vault, chunk, hash, length)
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (c, (vault, id)) in entries.iter().zip(owners) {
                add.execute(params![vault, &id[..], &c.hash.0[..], c.length])?;
            }
            let mut del = tx.prepare_cached("DELETE FROM vault_chunks WHERE id = ?1")?;
            for row in legacy {
                del.execute([row])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Up to `limit` sealed chunks still held as blobs in the index (from
    /// before migration 12): (row, vault, keyed id, bytes).
    pub fn vault_legacy_chunks(&self, limit: usize) -> Result<Vec<LegacyChunk>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, vault, chunk, bytes FROM vault_chunks ORDER BY id LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        rows.map(|row| {
            let (row, vault, id, bytes) = row?;
            let id: [u8; 32] = id
                .try_into()
                .map_err(|_| IndexError::Corrupt("a vault chunk id of the wrong size".into()))?;
            Ok(LegacyChunk {
                row,
                vault,
                id,
                bytes,
            })
        })
        .collect()
    }

    /// Stores sealed records, replacing those with the same ids.
    pub fn vault_put_records(&mut self, vault: i64, records: &[SealedEntry]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO vault_records (vault, record, bytes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (vault, record) DO UPDATE SET bytes = excluded.bytes",
            )?;
            for (id, bytes) in records {
                stmt.execute(params![vault, &id[..], bytes])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Sealed records after `after` (by id), until about `max_bytes` or
    /// `max_large` records larger than `inline` (listed by id only); and
    /// whether more follow.
    pub fn vault_records(
        &self,
        vault: i64,
        after: Option<[u8; 32]>,
        page: RecordPage,
    ) -> Result<(Vec<SealedEntry>, Vec<[u8; 32]>, bool)> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT record, CASE WHEN length(bytes) <= ?3 THEN bytes END FROM vault_records
             WHERE vault = ?1 AND record > ?2 ORDER BY record",
        )?;
        let start: Vec<u8> = after.map_or_else(Vec::new, |a| a.to_vec());
        let mut rows = stmt.query(params![vault, start, page.inline as i64])?;
        let (mut inline, mut large) = (Vec::new(), Vec::new());
        let mut total = 0usize;
        while let Some(r) = rows.next()? {
            let id: Vec<u8> = r.get(0)?;
            let bytes: Option<Vec<u8>> = r.get(1)?;
            let cost = bytes.as_ref().map_or(32, |b| b.len() + 64);
            let full = large.len() >= page.max_large || total + cost > page.max_bytes;
            if (!inline.is_empty() || !large.is_empty()) && full {
                return Ok((inline, large, true));
            }
            total += cost;
            let id: [u8; 32] = id
                .try_into()
                .map_err(|_| IndexError::Corrupt("a vault record id of the wrong size".into()))?;
            match bytes {
                Some(b) => inline.push((id, b)),
                None => large.push(id),
            }
        }
        Ok((inline, large, false))
    }

    /// One sealed record.
    pub fn vault_record(&self, vault: i64, id: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row(
                "SELECT bytes FROM vault_records WHERE vault = ?1 AND record = ?2",
                params![vault, &id[..]],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Notes that these history versions of `folder` went to `device` under
    /// these sealed record ids.
    pub fn note_sent_versions(
        &self,
        folder: i64,
        device: &DeviceId,
        sent: &[(i64, [u8; 32])],
    ) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT OR REPLACE INTO vault_sent_versions (folder, device, version, record)
             SELECT ?1, id, ?3, ?4 FROM devices WHERE device_id = ?2",
        )?;
        for (version, record) in sent {
            stmt.execute(params![folder, device.to_string(), version, &record[..]])?;
        }
        Ok(())
    }

    /// The versions sent to `device` that the history here no longer keeps:
    /// (history id, sealed record id), at most `limit`.
    pub fn pruned_sent_versions(
        &self,
        folder: i64,
        device: &DeviceId,
        limit: usize,
    ) -> Result<Vec<(i64, [u8; 32])>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT s.version, s.record FROM vault_sent_versions s
             WHERE s.folder = ?1 AND s.device = (SELECT id FROM devices WHERE device_id = ?2)
               AND NOT EXISTS (SELECT 1 FROM history h WHERE h.id = s.version)
             ORDER BY s.version LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![folder, device.to_string(), limit as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        rows.map(|row| {
            let (v, id) = row?;
            let id: [u8; 32] = id
                .try_into()
                .map_err(|_| IndexError::Corrupt("a sent record id of the wrong size".into()))?;
            Ok((v, id))
        })
        .collect()
    }

    /// Forgets sent versions the holder has dropped.
    pub fn forget_sent_versions(
        &self,
        folder: i64,
        device: &DeviceId,
        versions: &[i64],
    ) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "DELETE FROM vault_sent_versions WHERE folder = ?1 AND version = ?3
               AND device = (SELECT id FROM devices WHERE device_id = ?2)",
        )?;
        for v in versions {
            stmt.execute(params![folder, device.to_string(), v])?;
        }
        Ok(())
    }

    /// The hashes of every chunk a holder of `folder` needs: those of its live
    /// files and of the versions its history keeps.
    pub fn live_chunk_hashes(&self, folder: i64) -> Result<Vec<[u8; 32]>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT c.hash FROM chunks c JOIN files f ON f.id = c.file
               WHERE f.folder = ?1 AND f.deleted = 0
             UNION
             SELECT hc.hash FROM history_chunks hc JOIN history h ON h.id = hc.version
               WHERE h.folder = ?1",
        )?;
        let rows = stmt.query_map([folder], |r| r.get::<_, Vec<u8>>(0))?;
        rows.map(|row| {
            row?.try_into()
                .map_err(|_| IndexError::Corrupt("a chunk hash of the wrong size".into()))
        })
        .collect()
    }

    /// A page of the sealed chunk ids a vault holds, after `after`, at most
    /// `limit`; and whether more follow.
    pub fn vault_chunk_ids(
        &self,
        vault: i64,
        after: Option<[u8; 32]>,
        limit: usize,
    ) -> Result<(Vec<[u8; 32]>, bool)> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT chunk FROM vault_stored WHERE vault = ?1 AND chunk > ?2
             ORDER BY chunk LIMIT ?3",
        )?;
        let start: Vec<u8> = after.map_or_else(Vec::new, |a| a.to_vec());
        let rows = stmt.query_map(params![vault, start, limit as i64 + 1], |r| {
            r.get::<_, Vec<u8>>(0)
        })?;
        let mut ids = Vec::new();
        for row in rows {
            let id: [u8; 32] = row?
                .try_into()
                .map_err(|_| IndexError::Corrupt("a vault chunk id of the wrong size".into()))?;
            ids.push(id);
        }
        let more = ids.len() > limit;
        ids.truncate(limit);
        Ok((ids, more))
    }

    /// Drops sealed records and chunks from a vault (ids it does not hold
    /// are ignored), in one transaction; returns how many of each went. The
    /// chunks' bytes leave the chunk store at its next GC.
    pub fn vault_drop(
        &mut self,
        vault: i64,
        records: &[[u8; 32]],
        chunks: &[[u8; 32]],
    ) -> Result<(usize, usize)> {
        let tx = self.conn.transaction()?;
        let (mut r, mut c) = (0, 0);
        {
            let mut del =
                tx.prepare_cached("DELETE FROM vault_records WHERE vault = ?1 AND record = ?2")?;
            for id in records {
                r += del.execute(params![vault, &id[..]])?;
            }
            let mut del =
                tx.prepare_cached("DELETE FROM vault_stored WHERE vault = ?1 AND chunk = ?2")?;
            for id in chunks {
                c += del.execute(params![vault, &id[..]])?;
            }
        }
        tx.commit()?;
        Ok((r, c))
    }

    /// Where one sealed chunk's bytes are in the chunk store: their hash there,
    /// and their location (`None` if the store has lost them).
    pub fn vault_chunk(
        &self,
        vault: i64,
        id: &[u8; 32],
    ) -> Result<Option<(ChunkHash, Option<ChunkLocation>)>> {
        let hash = self
            .conn
            .query_row(
                "SELECT hash FROM vault_stored WHERE vault = ?1 AND chunk = ?2",
                params![vault, &id[..]],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()?;
        let Some(hash) = hash else {
            return Ok(None);
        };
        let hash = ChunkHash(
            hash.try_into()
                .map_err(|_| IndexError::Corrupt("a vault chunk hash of the wrong size".into()))?,
        );
        Ok(Some((hash, self.store_locate(&hash)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::store::ChunkStore;
    use std::time::Duration;

    #[test]
    fn devices_settle_on_the_smaller_secret_unless_a_holder_uses_theirs() {
        use crate::folder::FolderType;
        use crate::vault::FolderSecret;
        let dir = tempfile::tempdir().unwrap();
        let mut idx = Index::open(&dir.path().join("index.db"), Duration::from_secs(5)).unwrap();
        let f = idx
            .add_folder(
                &FolderId::new("docs").unwrap(),
                "docs",
                std::path::Path::new("/srv/docs"),
                FolderType::SendReceive,
                || Ok(()),
            )
            .unwrap();
        idx.set_folder_secret(f.row, &FolderSecret::from_bytes([5; 32]))
            .unwrap();
        // A larger one is not taken; a smaller one is; the same is a no-op.
        assert!(
            !idx.reconcile_secret("docs", &FolderSecret::from_bytes([9; 32]))
                .unwrap()
        );
        assert!(
            idx.reconcile_secret("docs", &FolderSecret::from_bytes([2; 32]))
                .unwrap()
        );
        assert!(
            !idx.reconcile_secret("docs", &FolderSecret::from_bytes([2; 32]))
                .unwrap()
        );
        assert_eq!(idx.folder_secret(f.row).unwrap().as_bytes(), &[2; 32]);
        assert!(
            !idx.reconcile_secret("nope", &FolderSecret::from_bytes([1; 32]))
                .unwrap()
        );
        // Once a holder keeps the folder sealed with it, it stays.
        let holder: DeviceId = "22".repeat(32).parse().unwrap();
        idx.add_peer(holder, "nas", &[]).unwrap();
        idx.add_vault_holder(&f.id, &holder).unwrap();
        assert!(
            !idx.reconcile_secret("docs", &FolderSecret::from_bytes([1; 32]))
                .unwrap()
        );
        assert_eq!(idx.folder_secret(f.row).unwrap().as_bytes(), &[2; 32]);
    }

    /// A holder's index and chunk store, holding vault `docs` (its row).
    fn holding() -> (tempfile::TempDir, Index, ChunkStore, i64) {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(&dir.path().join("index.db"), Duration::from_secs(5)).unwrap();
        let store = ChunkStore::open(&dir.path().join("store"), &idx).unwrap();
        let owner: DeviceId = "11".repeat(32).parse().unwrap();
        idx.add_peer(owner, "owner", &[]).unwrap();
        let v = idx.add_vault("docs", &owner, "Docs").unwrap();
        (dir, idx, store, v)
    }

    /// Stores sealed chunks as the holder does: one pack, then the rows.
    fn put(idx: &mut Index, store: &ChunkStore, vault: i64, chunks: &[SealedEntry]) {
        let bytes: Vec<&[u8]> = chunks.iter().map(|(_, b)| &b[..]).collect();
        let pack = store.write_pack(&bytes).unwrap();
        let owners: Vec<(i64, [u8; 32])> = chunks.iter().map(|(id, _)| (vault, *id)).collect();
        idx.vault_add_pack(&pack.name, pack.size, &pack.entries, &owners, &[])
            .unwrap();
    }

    /// A sealed chunk's bytes, read back from the store.
    fn get(idx: &Index, store: &ChunkStore, vault: i64, id: &[u8; 32]) -> Option<Vec<u8>> {
        let (hash, loc) = idx.vault_chunk(vault, id).unwrap()?;
        Some(
            store
                .reader()
                .unwrap()
                .read_at(&hash, &loc.unwrap())
                .unwrap(),
        )
    }

    #[test]
    fn a_vault_pages_its_chunk_ids_and_drops_what_it_is_told() {
        let (_dir, mut idx, store, v) = holding();
        let chunks: Vec<SealedEntry> = (0..10u8).map(|n| ([n; 32], vec![n; 3])).collect();
        put(&mut idx, &store, v, &chunks);
        idx.vault_put_records(v, &[([7; 32], vec![1]), ([8; 32], vec![2])])
            .unwrap();
        // Pages of 4: every id once, in order.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (ids, more) = idx.vault_chunk_ids(v, after, 4).unwrap();
            assert!(ids.len() <= 4);
            after = ids.last().copied();
            seen.extend(ids);
            if !more {
                break;
            }
        }
        assert_eq!(seen, (0..10u8).map(|n| [n; 32]).collect::<Vec<_>>());
        // Ids it does not hold are ignored; the rest go.
        let (r, c) = idx
            .vault_drop(v, &[[7; 32], [99; 32]], &[[0; 32], [5; 32], [99; 32]])
            .unwrap();
        assert_eq!((r, c), (1, 2));
        let (ids, more) = idx.vault_chunk_ids(v, None, 100).unwrap();
        assert!(!more);
        assert_eq!(ids.len(), 8);
        assert!(!ids.contains(&[5; 32]));
        assert!(idx.vault_record(v, &[7; 32]).unwrap().is_none());
        assert!(idx.vault_record(v, &[8; 32]).unwrap().is_some());
        // The dropped chunks' bytes leave the store at its GC; the rest stay.
        let before = idx.store_totals().unwrap();
        let gc = store.gc(&mut idx).unwrap();
        assert_eq!(gc.chunks_removed, 2, "{gc:?}");
        assert_eq!(idx.store_totals().unwrap().chunks, before.chunks - 2);
        assert_eq!(get(&idx, &store, v, &[6; 32]), Some(vec![6; 3]));
        assert_eq!(get(&idx, &store, v, &[5; 32]), None);
    }

    #[test]
    fn chunks_held_as_blobs_before_schema_12_move_into_the_store_and_read_back() {
        let (_dir, mut idx, store, v) = holding();
        for n in 0..300u32 {
            idx.conn
                .execute(
                    "INSERT INTO vault_chunks (vault, chunk, bytes) VALUES (?1, ?2, ?3)",
                    params![
                        v,
                        &[n as u8, (n >> 8) as u8, 7, 7].repeat(8),
                        vec![n as u8; 50]
                    ],
                )
                .unwrap();
        }
        let moved = crate::sync::holder::move_legacy_chunks(&mut idx, &store).unwrap();
        assert_eq!(moved, 300);
        assert!(idx.vault_legacy_chunks(10).unwrap().is_empty());
        let info = &idx.vaults().unwrap()[0];
        assert_eq!((info.chunks, info.chunk_bytes), (300, 300 * 50));
        let id: [u8; 32] = [5u8, 1, 7, 7].repeat(8).try_into().unwrap();
        assert_eq!(get(&idx, &store, v, &id), Some(vec![5; 50]));
        // Nothing is left to move a second time, and the GC keeps them all.
        assert_eq!(
            crate::sync::holder::move_legacy_chunks(&mut idx, &store).unwrap(),
            0
        );
        assert_eq!(store.gc(&mut idx).unwrap().chunks_removed, 0);
        assert_eq!(get(&idx, &store, v, &id), Some(vec![5; 50]));
    }

    #[test]
    fn a_vault_stores_chunks_once_and_pages_its_records() {
        let (_dir, mut idx, store, v) = holding();
        let owner: DeviceId = "11".repeat(32).parse().unwrap();
        assert!(idx.add_vault("docs", &owner, "Docs").is_err());

        put(
            &mut idx,
            &store,
            v,
            &[([1; 32], vec![1; 10]), ([2; 32], vec![2; 5])],
        );
        // A chunk sent again keeps its first bytes.
        put(&mut idx, &store, v, &[([1; 32], vec![9; 3])]);
        assert_eq!(get(&idx, &store, v, &[1; 32]), Some(vec![1; 10]));
        let info = &idx.vaults().unwrap()[0];
        assert_eq!((info.chunks, info.chunk_bytes), (2, 15));
        assert_eq!(
            idx.vault_missing(v, &[[2; 32], [3; 32], [1; 32]]).unwrap(),
            vec![1]
        );

        let records: Vec<([u8; 32], Vec<u8>)> =
            (0..10u8).map(|i| ([i; 32], vec![i; 100])).collect();
        idx.vault_put_records(v, &records).unwrap();
        idx.vault_put_records(v, &[([4; 32], vec![44; 7]), ([8; 32], vec![8; 5000])])
            .unwrap();
        let (mut got, mut big) = (Vec::new(), Vec::new());
        let mut after = None;
        let page = RecordPage {
            max_bytes: 400,
            inline: 1000,
            max_large: 4,
        };
        loop {
            let (inline, large, more) = idx.vault_records(v, after, page).unwrap();
            let n = inline.len() + large.len();
            assert!(n > 0 && n <= 3, "{n}");
            after = inline
                .iter()
                .map(|(id, _)| *id)
                .chain(large.iter().copied())
                .max();
            got.extend(inline);
            big.extend(large);
            if !more {
                break;
            }
        }
        assert_eq!(got.len(), 9);
        assert_eq!(got[4].1, vec![44; 7]);
        // The large one is listed by id, and read on its own.
        assert_eq!(big, vec![[8; 32]]);
        assert_eq!(idx.vault_record(v, &[8; 32]).unwrap().unwrap().len(), 5000);
        let info = &idx.vaults().unwrap()[0];
        assert_eq!((info.chunks, info.chunk_bytes, info.records), (2, 15, 10));
        assert_eq!(info.owner, owner);
        assert_eq!(
            idx.offers_to(&owner).unwrap(),
            vec![Offered {
                id: "docs".into(),
                label: "Docs".into(),
                encrypted: true,
                secret: None,
            }]
        );
    }
}
