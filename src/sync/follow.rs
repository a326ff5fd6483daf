//! Hashing a large file while it is assembled: ranges are reported as they
//! land (in any order), and a blocking thread hashes the file in order behind
//! them and starts writeback of what it has hashed. When the last range lands
//! only the tail is left to hash and little is left to fsync, instead of
//! reading the whole file again at the end.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// Start writeback once this much hashed data has accumulated.
const WRITEBACK_STEP: u64 = 8 << 20;

/// The sending side: report each range once its bytes are written.
#[derive(Clone)]
pub(super) struct Follower {
    ranges: SyncSender<(u64, u32)>,
}

/// The thread's result: the hash of the whole file, if every byte arrived.
pub(super) type Followed = tokio::task::JoinHandle<io::Result<Option<blake3::Hash>>>;

impl Follower {
    /// Starts following `file` of `size` bytes cut into `ranges` ranges.
    pub(super) fn start(file: Arc<File>, size: u64, ranges: usize) -> (Self, Followed) {
        // Room for every range, so a report never waits.
        let (tx, rx) = sync_channel(ranges.max(1));
        let handle = tokio::task::spawn_blocking(move || follow(&file, size, rx));
        (Self { ranges: tx }, handle)
    }

    /// Reports that `len` bytes at `offset` are written.
    pub(super) fn done(&self, offset: u64, len: u32) {
        // The thread only stops early on a read error, which the result reports.
        let _ = self.ranges.send((offset, len));
    }
}

fn follow(file: &File, size: u64, rx: Receiver<(u64, u32)>) -> io::Result<Option<blake3::Hash>> {
    let mut hasher = blake3::Hasher::new();
    let mut next = 0u64;
    let mut synced = 0u64;
    let mut waiting: BTreeMap<u64, u32> = BTreeMap::new();
    let mut buf = Vec::new();
    while next < size {
        let Ok((offset, len)) = rx.recv() else {
            // Every sender is gone and bytes are missing: the pull failed.
            return Ok(None);
        };
        if offset >= next {
            waiting.insert(offset, len);
        }
        while let Some(len) = waiting.remove(&next) {
            buf.resize(len as usize, 0);
            file.read_exact_at(&mut buf, next)?;
            hasher.update(&buf);
            next += len as u64;
        }
        if next - synced >= WRITEBACK_STEP {
            start_writeback(file, synced, next - synced);
            synced = next;
        }
    }
    Ok(Some(hasher.finalize()))
}

/// Asks the kernel to start writing a range out (without waiting), so the
/// final fsync finds little left to do.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: a plain syscall on an open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn hashes_ranges_reported_out_of_order() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let f = Arc::new(f);
        let (tx, result) = Follower::start(f, data.len() as u64, 3);
        tx.done(60_000, 40_000);
        tx.done(0, 10_000);
        tx.done(10_000, 50_000);
        assert_eq!(result.await.unwrap().unwrap(), Some(blake3::hash(&data)));
    }

    #[tokio::test]
    async fn a_missing_range_gives_no_hash() {
        let f = Arc::new(tempfile::tempfile().unwrap());
        f.set_len(20).unwrap();
        let (tx, result) = Follower::start(f, 20, 2);
        tx.done(10, 10);
        drop(tx);
        assert_eq!(result.await.unwrap().unwrap(), None);
    }
}
