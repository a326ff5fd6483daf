//! Index queries about each folder's vault secret (the root of the keys that
//! seal what an untrusted holder stores; see `vault`).

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{Index, IndexError, Result};
use crate::vault::FolderSecret;

impl Index {
    /// The folder's vault secret, made (random) and stored on first need if the
    /// folder has none yet. Never log or show it: `ferry folder key` prints it
    /// as a recovery code on purpose.
    pub fn folder_secret(&mut self, folder: i64) -> Result<FolderSecret> {
        if let Some(secret) = read_secret(&self.conn, folder)? {
            return Ok(secret);
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let fresh = FolderSecret::generate();
        tx.execute(
            "INSERT INTO folder_secrets (folder, secret)
             SELECT id, ?2 FROM folders WHERE id = ?1
             ON CONFLICT (folder) DO NOTHING",
            params![folder, &fresh.as_bytes()[..]],
        )?;
        let secret = read_secret(&tx, folder)?.ok_or(IndexError::UnknownFolder(folder))?;
        tx.commit()?;
        Ok(secret)
    }

    /// Replaces the folder's vault secret (with the one the folder's other
    /// devices hold). What was sealed with the old one can no longer be opened.
    pub fn set_folder_secret(&self, folder: i64, secret: &FolderSecret) -> Result<()> {
        let n = self.conn.execute(
            "INSERT INTO folder_secrets (folder, secret)
             SELECT id, ?2 FROM folders WHERE id = ?1
             ON CONFLICT (folder) DO UPDATE SET secret = excluded.secret",
            params![folder, &secret.as_bytes()[..]],
        )?;
        if n == 0 {
            return Err(IndexError::UnknownFolder(folder));
        }
        Ok(())
    }
}

/// Stores a fresh secret for a folder just inserted, inside the caller's
/// transaction.
pub(super) fn insert_fresh(tx: &rusqlite::Connection, folder: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO folder_secrets (folder, secret) VALUES (?1, ?2)",
        params![folder, &FolderSecret::generate().as_bytes()[..]],
    )?;
    Ok(())
}

/// Reads the secret straight from SQLite's buffer into a [`FolderSecret`], so
/// no other copy is left behind in this process.
fn read_secret(conn: &rusqlite::Connection, folder: i64) -> Result<Option<FolderSecret>> {
    conn.prepare_cached("SELECT secret FROM folder_secrets WHERE folder = ?1")?
        .query_row([folder], |r| {
            let blob = r.get_ref(0)?.as_blob()?;
            Ok(<[u8; 32]>::try_from(blob).map(FolderSecret::from_bytes))
        })
        .optional()?
        .map(|s| s.map_err(|_| IndexError::Corrupt(format!("the secret of folder {folder}"))))
        .transpose()
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::folder::{FolderId, FolderType};

    fn index_with_folder(dir: &Path, id: &str) -> (Index, i64) {
        let mut idx = Index::open(&dir.join("index.db"), Duration::from_millis(100)).unwrap();
        let f = idx
            .add_folder(
                &FolderId::new(id).unwrap(),
                id,
                &dir.join(id),
                FolderType::SendReceive,
                || Ok(()),
            )
            .unwrap();
        (idx, f.row)
    }

    #[test]
    fn a_new_folder_gets_its_own_stable_secret() {
        let dir = tempfile::tempdir().unwrap();
        let (mut idx, a) = index_with_folder(dir.path(), "a");
        let b = idx
            .add_folder(
                &FolderId::new("b").unwrap(),
                "b",
                &dir.path().join("b"),
                FolderType::SendReceive,
                || Ok(()),
            )
            .unwrap()
            .row;
        let secret_a = idx.folder_secret(a).unwrap();
        assert_eq!(idx.folder_secret(a).unwrap(), secret_a);
        assert_ne!(idx.folder_secret(b).unwrap(), secret_a);
    }

    #[test]
    fn a_folder_without_a_secret_gets_one_on_first_need() {
        let dir = tempfile::tempdir().unwrap();
        let (mut idx, a) = index_with_folder(dir.path(), "a");
        idx.conn
            .execute("DELETE FROM folder_secrets WHERE folder = ?1", [a])
            .unwrap();
        let made = idx.folder_secret(a).unwrap();
        assert_eq!(idx.folder_secret(a).unwrap(), made);
    }

    #[test]
    fn a_set_secret_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut idx, a) = index_with_folder(dir.path(), "a");
        let shared = FolderSecret::generate();
        idx.set_folder_secret(a, &shared).unwrap();
        assert_eq!(idx.folder_secret(a).unwrap(), shared);
    }

    #[test]
    fn unknown_folders_have_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let (mut idx, a) = index_with_folder(dir.path(), "a");
        let missing = a + 100;
        assert!(matches!(
            idx.folder_secret(missing),
            Err(IndexError::UnknownFolder(n)) if n == missing
        ));
        assert!(matches!(
            idx.set_folder_secret(missing, &FolderSecret::generate()),
            Err(IndexError::UnknownFolder(_))
        ));
    }

    #[test]
    fn removing_a_folder_forgets_its_secret() {
        let dir = tempfile::tempdir().unwrap();
        let (mut idx, a) = index_with_folder(dir.path(), "a");
        idx.remove_folder(&FolderId::new("a").unwrap()).unwrap();
        let left: i64 = idx
            .conn
            .query_row("SELECT COUNT(*) FROM folder_secrets", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
        assert!(idx.folder_secret(a).is_err());
    }

    #[test]
    fn a_corrupt_secret_is_reported_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let (mut idx, a) = index_with_folder(dir.path(), "a");
        // The CHECK keeps SQL writers honest; bypass it to model a damaged file.
        idx.conn
            .execute_batch("PRAGMA ignore_check_constraints = ON")
            .unwrap();
        idx.conn
            .execute(
                "UPDATE folder_secrets SET secret = X'00' WHERE folder = ?1",
                [a],
            )
            .unwrap();
        assert!(matches!(idx.folder_secret(a), Err(IndexError::Corrupt(_))));
    }
}
