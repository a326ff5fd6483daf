//! The chunk lists of the large files this device serves, as its index
//! recorded them, each with the stat the file had when it was hashed. A
//! chunk read from a file whose stat still matches, at an offset where that
//! list has it, is the chunk the scanner hashed (the rule the scanner itself
//! uses to skip unchanged files), so it is sent without hashing it again; a
//! file whose stat differs, or a chunk the list does not have there, is
//! checked against its hash as before.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, PoisonError};

use crate::chunking::{ChunkHash, ChunkInfo};
use crate::disk::mtime_ns;
use crate::index::FileMeta;

/// Files smaller than this are always hashed: a one-chunk file costs an
/// index read to trust, more than its hash.
pub const MIN_SIZE: u64 = 4 << 20;
/// How many files' lists are kept (a few large files are served at once).
const KEPT: usize = 4;

/// The stat fields that say a file is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    size: u64,
    mtime_ns: i64,
    ino: u64,
    dev: u64,
}

impl Stat {
    /// The stat of an open file.
    pub fn of(m: &Metadata) -> Self {
        Self {
            size: m.len(),
            mtime_ns: mtime_ns(m),
            ino: m.ino(),
            dev: m.dev(),
        }
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The stat the index recorded.
    pub fn recorded(m: &FileMeta) -> Self {
        Self {
            size: m.size,
            mtime_ns: m.mtime_ns,
            ino: m.inode,
            dev: m.dev,
        }
    }
}

/// Chunks by offset: length and hash.
type Chunks = HashMap<u64, (u32, ChunkHash)>;

struct Entry {
    row: i64,
    path: String,
    stat: Stat,
    chunks: Arc<Chunks>,
}

/// The lists of the files served most recently.
#[derive(Default)]
pub struct Served {
    files: Mutex<VecDeque<Entry>>,
    /// Files whose list is being read from the index (once at a time).
    loading: Mutex<HashSet<(i64, String)>>,
}

/// The right to read one file's list; released when dropped.
pub struct Loading<'a> {
    served: &'a Served,
    key: (i64, String),
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let mut loading = self
            .served
            .loading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loading.remove(&self.key);
    }
}

impl Served {
    /// Whether a list is kept for `path` of folder `row`, whatever its stat.
    pub fn lists(&self, row: i64, path: &str) -> bool {
        let files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        files.iter().any(|e| e.row == row && e.path == path)
    }

    /// Whether `path` of folder `row`, with `stat` now, holds the chunk
    /// `hash` of `len` bytes at `offset` by its recorded list. `None`: no
    /// list is kept for the file with that stat.
    pub fn vouches(
        &self,
        row: i64,
        path: &str,
        stat: Stat,
        offset: u64,
        len: u32,
        hash: &ChunkHash,
    ) -> Option<bool> {
        let files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let e = files
            .iter()
            .find(|e| e.row == row && e.stat == stat && e.path == path)?;
        Some(e.chunks.get(&offset) == Some(&(len, *hash)))
    }

    /// The right to read the list of `path` in folder `row` from the index,
    /// unless another request is reading it now.
    pub fn load(&self, row: i64, path: &str) -> Option<Loading<'_>> {
        let key = (row, path.to_owned());
        let mut loading = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        // Built only when taken: dropping one releases the key.
        if loading.insert(key.clone()) {
            Some(Loading { served: self, key })
        } else {
            None
        }
    }

    /// Keeps the list `chunks` of `path` in folder `row`, recorded for a file
    /// with `stat`, in place of any older one of the same file.
    pub fn keep(&self, row: i64, path: &str, stat: Stat, chunks: &[ChunkInfo]) {
        let map: Chunks = chunks.iter().map(|c| (c.offset, (c.len, c.hash))).collect();
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        files.retain(|e| !(e.row == row && e.path == path));
        if files.len() >= KEPT {
            files.pop_back();
        }
        files.push_front(Entry {
            row,
            path: path.to_owned(),
            stat,
            chunks: Arc::new(map),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(mtime_ns: i64) -> Stat {
        Stat {
            size: 10 << 20,
            mtime_ns,
            ino: 7,
            dev: 1,
        }
    }

    fn chunk(offset: u64, len: u32, h: u8) -> ChunkInfo {
        ChunkInfo {
            offset,
            len,
            hash: ChunkHash([h; 32]),
        }
    }

    #[test]
    fn only_a_file_with_the_recorded_stat_and_a_chunk_at_its_place_is_vouched_for() {
        let s = Served::default();
        s.keep(
            1,
            "big.bin",
            stat(5),
            &[chunk(0, 100, 1), chunk(100, 50, 2)],
        );
        let h2 = ChunkHash([2; 32]);
        assert_eq!(s.vouches(1, "big.bin", stat(5), 100, 50, &h2), Some(true));
        // Another place, length or hash: not this list's chunk.
        assert_eq!(s.vouches(1, "big.bin", stat(5), 0, 50, &h2), Some(false));
        assert_eq!(s.vouches(1, "big.bin", stat(5), 100, 49, &h2), Some(false));
        assert_eq!(
            s.vouches(1, "big.bin", stat(5), 100, 50, &ChunkHash([3; 32])),
            Some(false)
        );
        // The file changed since (or another file, or folder): no list.
        assert_eq!(s.vouches(1, "big.bin", stat(6), 100, 50, &h2), None);
        assert_eq!(s.vouches(1, "other.bin", stat(5), 100, 50, &h2), None);
        assert_eq!(s.vouches(2, "big.bin", stat(5), 100, 50, &h2), None);
        // A newer list replaces the old one; the oldest files are dropped.
        s.keep(1, "big.bin", stat(6), &[chunk(0, 150, 4)]);
        assert_eq!(s.vouches(1, "big.bin", stat(5), 100, 50, &h2), None);
        for n in 0..KEPT {
            s.keep(1, &format!("f{n}"), stat(5), &[]);
        }
        assert_eq!(
            s.vouches(1, "big.bin", stat(6), 0, 150, &ChunkHash([4; 32])),
            None
        );
        assert_eq!(s.vouches(1, "f0", stat(5), 0, 1, &h2), Some(false));
    }

    #[test]
    fn one_request_at_a_time_reads_a_files_list() {
        let s = Served::default();
        let first = s.load(1, "big.bin");
        assert!(first.is_some());
        assert!(s.load(1, "big.bin").is_none());
        assert!(s.load(1, "other.bin").is_some());
        drop(first);
        assert!(s.load(1, "big.bin").is_some());
    }
}
