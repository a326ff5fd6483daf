//! Index queries about other devices: pairings, shared folders, folder offers.

use std::net::SocketAddr;

use rusqlite::{OptionalExtension, params};

use super::{Index, IndexError, Result, now_secs};
use crate::device::DeviceId;
use crate::folder::FolderId;

/// A paired device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its id.
    pub id: DeviceId,
    /// Its name (as it announced itself, or as named at pairing).
    pub name: String,
    /// Where it was last reached.
    pub addresses: Vec<SocketAddr>,
    /// When it was last connected (Unix seconds).
    pub last_seen_at: Option<i64>,
}

/// A folder a peer offered to share with this device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Offer {
    /// Row id, what `ferry folder accept` takes.
    pub id: i64,
    /// The offering device.
    pub device: String,
    /// Its name.
    pub device_name: String,
    /// The folder id.
    pub folder_id: String,
    /// The peer's label.
    pub label: String,
    /// When it was offered (Unix seconds).
    pub offered_at: i64,
    /// Offered to hold as an encrypted backup (accepting makes a vault).
    pub encrypted: bool,
    /// The folder's vault secret, as the offering device holds it.
    #[serde(skip)]
    pub secret: Option<crate::vault::FolderSecret>,
}

fn parse_addrs(json: &str) -> Vec<SocketAddr> {
    serde_json::from_str(json).unwrap_or_default()
}

/// A device id as stored, or why the stored text is not one.
pub(super) fn device_id(s: &str) -> Result<DeviceId> {
    s.parse()
        .map_err(|e| IndexError::Corrupt(format!("device id {s:?}: {e}")))
}

impl Index {
    /// Every paired device (not this one), by name.
    pub fn peers(&self) -> Result<Vec<Peer>> {
        let mut stmt = self.conn.prepare(
            "SELECT device_id, name, addresses, last_seen_at FROM devices
             WHERE is_local = 0 ORDER BY name, device_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })?;
        rows.map(|row| {
            let (id, name, addrs, last_seen_at) = row?;
            Ok(Peer {
                id: device_id(&id)?,
                name,
                addresses: parse_addrs(&addrs),
                last_seen_at,
            })
        })
        .collect()
    }

    /// One paired device.
    pub fn peer(&self, id: &DeviceId) -> Result<Option<Peer>> {
        Ok(self.peers()?.into_iter().find(|p| &p.id == id))
    }

    /// Records a paired device (or updates its name and addresses).
    pub fn add_peer(&self, id: DeviceId, name: &str, addrs: &[SocketAddr]) -> Result<()> {
        let addrs = serde_json::to_string(addrs).expect("addresses serialize");
        let n = self.conn.execute(
            "INSERT INTO devices (device_id, short_id, name, is_local, addresses, added_at)
             VALUES (?1, ?2, ?3, 0, ?4, ?5)
             ON CONFLICT(device_id) DO UPDATE SET name = excluded.name,
                addresses = excluded.addresses
             WHERE is_local = 0",
            params![id.to_string(), id.short().0 as i64, name, addrs, now_secs()],
        )?;
        if n == 0 {
            return Err(IndexError::Duplicate(
                "a device cannot pair with itself".into(),
            ));
        }
        Ok(())
    }

    /// Records that a peer was connected now, at `addr` if direct.
    pub fn peer_seen(&self, id: &DeviceId, addr: Option<SocketAddr>) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        let old: Option<String> = tx
            .query_row(
                "SELECT addresses FROM devices WHERE device_id = ?1 AND is_local = 0",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        let Some(old) = old else { return Ok(()) };
        let mut addrs = parse_addrs(&old);
        if let Some(a) = addr {
            addrs.retain(|x| *x != a);
            addrs.insert(0, a);
            addrs.truncate(8);
        }
        tx.execute(
            "UPDATE devices SET addresses = ?2, last_seen_at = ?3 WHERE device_id = ?1",
            params![
                id.to_string(),
                serde_json::to_string(&addrs).expect("addresses serialize"),
                now_secs()
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets a paired device, its shares and offers. Returns whether it existed.
    pub fn remove_peer(&self, id: &DeviceId) -> Result<bool> {
        let n = self.conn.execute(
            "DELETE FROM devices WHERE device_id = ?1 AND is_local = 0",
            [id.to_string()],
        )?;
        Ok(n > 0)
    }

    /// Shares a folder with a paired device (idempotent).
    pub fn share_folder(&self, folder: &FolderId, device: &DeviceId) -> Result<()> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO folder_devices (folder, device)
             SELECT f.id, d.id FROM folders f, devices d
             WHERE f.folder_id = ?1 AND d.device_id = ?2 AND d.is_local = 0",
            params![folder.as_str(), device.to_string()],
        )?;
        if n == 0 {
            let known: bool = self.conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM folder_devices fd
                   JOIN folders f ON f.id = fd.folder JOIN devices d ON d.id = fd.device
                   WHERE f.folder_id = ?1 AND d.device_id = ?2)",
                params![folder.as_str(), device.to_string()],
                |r| r.get(0),
            )?;
            if !known {
                return Err(IndexError::Duplicate(format!(
                    "cannot share {folder} with {device}: unknown folder or device"
                )));
            }
        }
        Ok(())
    }

    /// The folders shared with a device: (id, label).
    pub fn folders_shared_with(&self, device: &DeviceId) -> Result<Vec<(FolderId, String)>> {
        let mut stmt = self.conn.prepare(
            "SELECT f.folder_id, f.label FROM folder_devices fd
             JOIN folders f ON f.id = fd.folder JOIN devices d ON d.id = fd.device
             WHERE d.device_id = ?1 ORDER BY f.folder_id",
        )?;
        let rows = stmt.query_map([device.to_string()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        rows.map(|row| {
            let (id, label) = row?;
            let id = FolderId::new(&id).map_err(|e| IndexError::Corrupt(e.to_string()))?;
            Ok((id, label))
        })
        .collect()
    }

    /// The devices a folder is shared with.
    pub fn folder_devices(&self, folder: &FolderId) -> Result<Vec<DeviceId>> {
        let mut stmt = self.conn.prepare(
            "SELECT d.device_id FROM folder_devices fd
             JOIN folders f ON f.id = fd.folder JOIN devices d ON d.id = fd.device
             WHERE f.folder_id = ?1 ORDER BY d.device_id",
        )?;
        let rows = stmt.query_map([folder.as_str()], |r| r.get::<_, String>(0))?;
        rows.map(|row| device_id(&row?)).collect()
    }

    /// Records the folders a peer offers (id, label, encrypted), except those
    /// this device already has as a folder or vault, or declined. Returns how
    /// many offers are new.
    pub fn record_offers(&self, device: &DeviceId, offers: &[super::Offered]) -> Result<usize> {
        let tx = self.conn.unchecked_transaction()?;
        let mut added = 0;
        for o in offers {
            let (folder_id, label, encrypted) = (&o.id, &o.label, o.encrypted);
            let secret = o
                .secret
                .as_ref()
                .filter(|_| !encrypted)
                .map(|s| s.as_bytes().to_vec());
            let have: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM folders WHERE folder_id = ?1)
                     OR EXISTS (SELECT 1 FROM vaults WHERE folder_id = ?1)",
                [folder_id],
                |r| r.get(0),
            )?;
            if have {
                continue;
            }
            added += tx.execute(
                "INSERT INTO folder_offers (device, folder_id, label, offered_at, encrypted, secret)
                 SELECT id, ?2, ?3, ?4, ?5, ?6 FROM devices WHERE device_id = ?1 AND is_local = 0
                 ON CONFLICT(device, folder_id)
                 DO UPDATE SET label = excluded.label, encrypted = excluded.encrypted,
                               secret = excluded.secret",
                params![device.to_string(), folder_id, label, now_secs(), encrypted, secret],
            )?;
        }
        tx.commit()?;
        Ok(added)
    }

    /// Pending (not declined) offers.
    pub fn offers(&self) -> Result<Vec<Offer>> {
        let mut stmt = self.conn.prepare(
            "SELECT o.id, d.device_id, d.name, o.folder_id, o.label, o.offered_at, o.encrypted,
                    o.secret
             FROM folder_offers o JOIN devices d ON d.id = o.device
             WHERE o.declined = 0
               AND NOT EXISTS (SELECT 1 FROM folders f WHERE f.folder_id = o.folder_id)
               AND NOT EXISTS (SELECT 1 FROM vaults v WHERE v.folder_id = o.folder_id)
             ORDER BY o.id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Offer {
                id: r.get(0)?,
                device: r.get(1)?,
                device_name: r.get(2)?,
                folder_id: r.get(3)?,
                label: r.get(4)?,
                offered_at: r.get(5)?,
                encrypted: r.get(6)?,
                secret: r
                    .get::<_, Option<Vec<u8>>>(7)?
                    .and_then(|s| <[u8; 32]>::try_from(s).ok())
                    .map(crate::vault::FolderSecret::from_bytes),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Marks an offer declined, so it is not shown again. Returns whether it existed.
    pub fn decline_offer(&self, id: i64) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE folder_offers SET declined = 1 WHERE id = ?1 AND declined = 0",
            [id],
        )?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// At link-up the agent records the peer (a read, then a write) while the
    /// link's first index update commits on another connection: recording
    /// must wait for that writer, not fail with "database is locked" at once.
    #[test]
    fn recording_a_link_waits_for_a_writer_that_commits_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("index.db");
        let idx = Index::open(&db, Duration::from_secs(5)).unwrap();
        let peer: DeviceId = "11".repeat(32).parse().unwrap();
        idx.add_peer(peer, "laptop", &[]).unwrap();

        let writer = Index::open(&db, Duration::from_secs(5)).unwrap();
        writer.conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        writer
            .conn
            .execute(
                "UPDATE devices SET name = 'renamed' WHERE device_id = ?1",
                [peer.to_string()],
            )
            .unwrap();
        let commit = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            writer.conn.execute_batch("COMMIT").unwrap();
        });
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        idx.peer_seen(&peer, Some(addr)).unwrap();
        commit.join().unwrap();

        let seen = idx.peer(&peer).unwrap().expect("still paired");
        assert_eq!(seen.name, "renamed", "the other writer's change was kept");
        assert_eq!(seen.addresses, vec![addr]);
    }
}
