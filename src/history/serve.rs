//! Reading this device's versions for a peer that shares their folder: a
//! chunk no live file holds any more is looked up among the versions kept of
//! that folder only, so a peer never reads another folder's history.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::pending_file;
use super::store::ChunkStore;
use crate::chunking::ChunkHash;
use crate::index::{ChunkLocation, Index, IndexError, VersionChunk};

/// Versions of one folder that hold a chunk, and where the store keeps it.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// Versions of the folder holding it (pending files are read from these).
    pub versions: Vec<VersionChunk>,
    /// Its place in the chunk store, if some version's bytes are stored.
    pub stored: Option<ChunkLocation>,
}

/// Looks up a chunk among the versions of folder `folder` (row id). Nothing
/// is found when no version of that folder holds it, even if another
/// folder's does.
pub fn locate_chunk(
    index: &Index,
    folder: i64,
    hash: &ChunkHash,
    size: u32,
) -> Result<Found, IndexError> {
    let versions = index.history_chunk_in(folder, hash, size, 8)?;
    if versions.is_empty() {
        return Ok(Found::default());
    }
    let stored = if versions.iter().any(|v| v.stored) {
        index.store_locate(hash)?.filter(|l| l.length == size)
    } else {
        None
    };
    Ok(Found { versions, stored })
}

/// Reads a chunk [`locate_chunk`] found, from the store or a pending version
/// file of the folder at `root`; `None` unless bytes with that hash were read.
pub fn read_chunk(
    store: &ChunkStore,
    root: &Path,
    found: &Found,
    hash: &ChunkHash,
    size: u32,
) -> Option<Vec<u8>> {
    if let Some(loc) = &found.stored
        && let Ok(data) = store.reader().and_then(|mut r| r.read_at(hash, loc))
    {
        return Some(data);
    }
    found.versions.iter().filter(|v| !v.stored).find_map(|v| {
        let f = File::open(pending_file(root, v.version)).ok()?;
        let mut buf = vec![0u8; size as usize];
        f.read_exact_at(&mut buf, v.offset).ok()?;
        (blake3::hash(&buf).as_bytes() == &hash.0).then_some(buf)
    })
}

/// Looks a chunk up (`locate`, [`locate_chunk`] with the index at hand) and
/// reads it (`read`, [`read_chunk`]). When it was found in a version still
/// pending and could not be read, it looks once more: the history task may
/// have moved that version into the store in between, and it commits the
/// rows before it deletes the file, so the second lookup finds it stored.
pub fn find_chunk<E>(
    mut locate: impl FnMut() -> Result<Found, E>,
    mut read: impl FnMut(&Found) -> Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    for _ in 0..2 {
        let found = locate().ok()?;
        if found.versions.is_empty() {
            return None;
        }
        let pending = found.versions.iter().any(|v| !v.stored);
        let data = read(&found);
        if data.is_some() || !pending {
            return data;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::chunking::ChunkInfo;
    use crate::chunking::{DEFAULT_PARAMS, chunk_bytes, pseudo_random};
    use crate::history::ingest::ingest_pending;
    use crate::history::ingest::tests::{Fixture, fixture};

    /// A folder where `a.bin` was replaced, its first version still pending
    /// in the history; that version and its second chunk.
    fn replaced(seed: u64) -> (Fixture, Vec<u8>, ChunkInfo) {
        let mut f = fixture();
        let v1 = pseudo_random(300_000, seed);
        f.record("a.bin", &v1);
        f.replace("a.bin", b"second");
        let c = chunk_bytes(&v1, DEFAULT_PARAMS).chunks[1];
        (f, v1, c)
    }

    #[test]
    fn a_version_stored_after_it_was_found_pending_is_read_once_found_again() {
        let (mut f, v1, c) = replaced(5);
        let found = locate_chunk(&f.index, f.folder.row, &c.hash, c.len).unwrap();
        assert!(found.stored.is_none() && !found.versions.is_empty());

        // The history task moves the version into the store in between.
        ingest_pending(&mut f.index, &f.store, &mut HashSet::new(), &|| false).unwrap();

        // What was found is gone from where it was found (why serving a
        // chunk looks again, once, when a pending version could not be read)...
        assert_eq!(
            read_chunk(&f.store, &f.folder.path, &found, &c.hash, c.len),
            None
        );
        // ... and found again, it is read from the store.
        let again = locate_chunk(&f.index, f.folder.row, &c.hash, c.len).unwrap();
        assert!(again.stored.is_some());
        let want = &v1[c.offset as usize..][..c.len as usize];
        let got = read_chunk(&f.store, &f.folder.path, &again, &c.hash, c.len).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn a_chunk_whose_version_moves_into_the_store_while_it_is_read_is_still_served() {
        let (mut f, v1, c) = replaced(6);
        let want = &v1[c.offset as usize..][..c.len as usize];
        let (row, root) = (f.folder.row, f.folder.path.clone());

        // The race, made to happen every time: the history task ingests the
        // version right after the first lookup found it pending.
        let (mut lookups, mut reads) = (0, 0);
        let index = std::cell::RefCell::new(&mut f.index);
        let got = find_chunk(
            || {
                lookups += 1;
                let found = locate_chunk(&index.borrow(), row, &c.hash, c.len);
                if lookups == 1 {
                    assert!(found.as_ref().is_ok_and(|x| x.stored.is_none()));
                    ingest_pending(
                        &mut index.borrow_mut(),
                        &f.store,
                        &mut HashSet::new(),
                        &|| false,
                    )
                    .unwrap();
                }
                found
            },
            |found| {
                reads += 1;
                read_chunk(&f.store, &root, found, &c.hash, c.len)
            },
        );
        assert_eq!(got.as_deref(), Some(want));
        assert_eq!((lookups, reads), (2, 2));

        // A chunk no version holds is not looked up twice.
        let mut lookups = 0;
        let missing = ChunkHash([7; 32]);
        let got = find_chunk(
            || {
                lookups += 1;
                locate_chunk(&index.borrow(), row, &missing, c.len)
            },
            |found| read_chunk(&f.store, &root, found, &missing, c.len),
        );
        assert_eq!((got, lookups), (None, 1));
    }
}
