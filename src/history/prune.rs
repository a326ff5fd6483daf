//! Applying the retention policy: the versions [`retention::prune`] picks are
//! deleted from the index (durably), then their pending files, and then the
//! chunk store's GC drops the chunks nothing refers to any more.
//!
//! [`retention::prune`]: super::retention::prune

use std::fs;
use std::io;

use super::retention::{self, Policy};
use super::store::{ChunkStore, GcStats, StoreError};
use super::{Result, damaged_marker, pending_file};
use crate::index::{Folder, Index};

/// What pruning did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Versions deleted.
    pub versions: u64,
    /// Their sizes added up.
    pub bytes: u64,
    /// What GC did, if it ran.
    pub gc: Option<GcStats>,
    /// GC could not run: the store was in use (it runs next time).
    pub gc_busy: bool,
}

/// Deletes the versions of `folder` that `policy` prunes at `now` (Unix
/// seconds). Returns (versions, bytes).
pub fn prune_folder(
    index: &mut Index,
    folder: &Folder,
    policy: &Policy,
    now: i64,
) -> Result<(u64, u64)> {
    let versions = index.history_for_retention(folder.row)?;
    let ids = retention::prune(&versions, now, policy);
    if ids.is_empty() {
        return Ok((0, 0));
    }
    let bytes = versions
        .iter()
        .filter(|v| ids.binary_search(&v.id).is_ok())
        .map(|v| v.size)
        .sum();
    let pending = index.history_delete(&ids)?;
    // The rows are gone for good: their files may go now.
    for id in pending {
        for f in [
            pending_file(&folder.path, id),
            damaged_marker(&folder.path, id),
        ] {
            match fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("{}: {e}", f.display()),
            }
        }
    }
    Ok((ids.len() as u64, bytes))
}

/// Prunes each folder under its policy, then runs the store's GC.
pub fn prune(
    index: &mut Index,
    store: &ChunkStore,
    folders: &[(Folder, Policy)],
    now: i64,
) -> Result<PruneReport> {
    let mut report = PruneReport::default();
    for (f, policy) in folders {
        let (n, bytes) = prune_folder(index, f, policy, now)?;
        report.versions += n;
        report.bytes += bytes;
    }
    match store.gc(index) {
        Ok(stats) => report.gc = Some(stats),
        Err(StoreError::Busy) => report.gc_busy = true,
        Err(e) => return Err(e.into()),
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::history::ingest::{ingest_pending, tests::fixture};
    use crate::history::retention::Retention;
    use crate::relpath::RelPath;

    const HOUR: i64 = 3600;
    const DAY: i64 = 86_400;

    #[test]
    fn retention_prunes_exactly_what_the_policy_says_and_gc_frees_their_chunks() {
        let mut f = fixture();
        let now = crate::index::now_secs();
        // Versions of a.txt superseded 40, 20, 10 and 2 days and 10 minutes
        // ago, one of b.txt 3 days ago; each distinct content.
        let ages = [40 * DAY, 20 * DAY, 10 * DAY, 2 * DAY, 600];
        let mut ids = Vec::new();
        f.record("a.txt", &[0u8; 50_000]);
        for (i, age) in ages.iter().enumerate() {
            let id = f.replace("a.txt", &[i as u8 + 1; 50_000]);
            f.index
                .conn_for_tests()
                .execute(
                    "UPDATE history SET superseded_at = ?2 WHERE id = ?1",
                    [id, now - age],
                )
                .unwrap();
            ids.push(id);
        }
        f.record("b.txt", &[100u8; 40_000]);
        let b = f.replace("b.txt", &[101u8; 40_000]);
        f.index
            .conn_for_tests()
            .execute(
                "UPDATE history SET superseded_at = ?2 WHERE id = ?1",
                [b, now - 3 * DAY],
            )
            .unwrap();
        // One version stays pending (its file still in .ferry/versions).
        ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();
        let pending = f.replace("b.txt", &[102u8; 40_000]);
        f.index
            .conn_for_tests()
            .execute(
                "UPDATE history SET superseded_at = ?2 WHERE id = ?1",
                [pending, now - 2 * HOUR],
            )
            .unwrap();

        // Keep everything for 15 days, at most 150,000 bytes: the 40- and
        // 20-day versions go by age, then the oldest (10 days, then b's
        // 3-day one) until the rest fits; the last hour is never pruned.
        let policy = Policy {
            retention: Retention::KeepAll,
            max_age: Some(Duration::from_secs(15 * DAY as u64)),
            max_bytes: Some(150_000),
            keep_local: false,
        };
        let before = f.store.stats(&f.index).unwrap();
        let report = prune(&mut f.index, &f.store, &[(f.folder.clone(), policy)], now).unwrap();
        assert_eq!(report.versions, 4);
        assert_eq!(report.bytes, 3 * 50_000 + 40_000);
        let left: HashSet<i64> = ["a.txt", "b.txt"]
            .iter()
            .flat_map(|p| {
                f.index
                    .history_of(f.folder.row, Some(&RelPath::new(p).unwrap()), false)
                    .unwrap()
            })
            .map(|v| v.id)
            .collect();
        assert_eq!(left, HashSet::from([ids[3], ids[4], pending]));
        let gc = report.gc.expect("gc ran");
        assert!(gc.chunks_removed > 0, "{gc:?}");
        let after = f.store.stats(&f.index).unwrap();
        assert!(after.chunk_bytes < before.chunk_bytes);
        assert!(
            crate::history::verify::verify(&f.index, &f.store)
                .unwrap()
                .is_ok()
        );
        for id in [ids[3], ids[4], pending] {
            assert!(!f.restore_bytes(id).is_empty());
        }

        // The pending version's file goes with its row.
        let file = pending_file(&f.folder.path, pending);
        assert!(file.exists());
        let all = Policy {
            retention: Retention::KeepAll,
            max_age: Some(Duration::from_secs(HOUR as u64)),
            max_bytes: None,
            keep_local: false,
        };
        prune(&mut f.index, &f.store, &[(f.folder.clone(), all)], now).unwrap();
        assert!(!file.exists());
        assert_eq!(f.index.history_totals(None).unwrap().versions, 1);
    }
}
