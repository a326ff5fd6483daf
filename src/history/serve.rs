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
