//! Gathers the chunk writes of one file being assembled: chunks that arrive
//! one after another at adjacent offsets (most of a large file, which is asked
//! for in file order) reach the disk in one vectored write of up to
//! [`GATHER`] bytes instead of one write each. A GiB is about 13,000 chunks,
//! and every write is a syscall and, in a watched folder, an inotify event
//! that wakes the watcher thread; gathered, they are about a thousand.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::verifier::Marker;
use crate::disk::{MAX_PARTS, WRITEBACK_EVERY, start_writeback, write_all_vectored_at};

/// Bytes gathered before they are written.
pub const GATHER: u64 = 1 << 20;

/// The gathered writes of one file; shared by the tasks fetching its chunks.
pub struct Gather {
    file: Arc<File>,
    marker: Marker,
    /// Bytes gathered before they are written: [`GATHER`], or less for a
    /// smaller file, whose chunks then go out as soon as all have come.
    gather: u64,
    pending: Mutex<Pending>,
    written: AtomicU64,
}

/// Chunks not yet written, by offset.
#[derive(Default)]
struct Pending {
    chunks: BTreeMap<u64, Vec<u8>>,
    bytes: u64,
}

impl Gather {
    /// Gathers writes to `file`, `size` bytes long, reporting each range to
    /// `marker` once it is written.
    pub fn new(file: Arc<File>, marker: Marker, size: u64) -> Self {
        Self {
            file,
            marker,
            gather: size.clamp(1, GATHER),
            pending: Mutex::default(),
            written: AtomicU64::new(0),
        }
    }

    /// Takes `bytes` for `offset`: written with the chunks gathered so far
    /// once they reach [`GATHER`] bytes, else by a later `put` or by
    /// [`Gather::flush`]. Chunks that complete a little out of order (two
    /// tasks finishing together) still join their neighbours. An error is a
    /// write that failed, of these bytes or of others gathered before them.
    pub fn put(&self, offset: u64, bytes: Vec<u8>) -> io::Result<()> {
        let len = bytes.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let full = {
            let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            p.bytes += len;
            p.chunks.insert(offset, bytes);
            (p.bytes >= self.gather).then(|| std::mem::take(&mut *p))
        };
        // Taken out whole, so disjoint from anything gathered after: written
        // outside the lock.
        full.map_or(Ok(()), |p| self.write(p))
    }

    /// Writes whatever is still gathered.
    pub fn flush(&self) -> io::Result<()> {
        let p = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        self.write(p)
    }

    /// Writes each run of adjacent chunks in `p` with one vectored write;
    /// one that fails does not stop the others (each chunk on disk is one a
    /// resumed pull need not fetch again). Returns the first error.
    fn write(&self, p: Pending) -> io::Result<()> {
        let mut result = Ok(());
        let mut run: Vec<&[u8]> = Vec::new();
        let (mut start, mut end) = (0u64, 0u64);
        for (&off, bytes) in &p.chunks {
            if !run.is_empty() && (off != end || run.len() >= MAX_PARTS) {
                result = result.and(self.write_run(&run, start, end));
                run.clear();
            }
            if run.is_empty() {
                start = off;
            }
            run.push(bytes);
            end = off + bytes.len() as u64;
        }
        if !run.is_empty() {
            result = result.and(self.write_run(&run, start, end));
        }
        result
    }

    fn write_run(&self, parts: &[&[u8]], start: u64, end: u64) -> io::Result<()> {
        write_all_vectored_at(&self.file, parts, start)?;
        let len = end - start;
        self.marker.filled(start, len);
        let before = self.written.fetch_add(len, Ordering::Relaxed);
        if before % WRITEBACK_EVERY + len >= WRITEBACK_EVERY {
            start_writeback(&self.file);
        }
        Ok(())
    }
}

impl Drop for Gather {
    /// A pull that ends early (a local copy failed while fetches ran) still
    /// writes the checked chunks it gathered, for the next try to resume with.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::pseudo_random;
    use proptest::prelude::*;
    use std::os::unix::fs::FileExt;

    fn temp_file(len: u64) -> (tempfile::TempDir, Arc<File>) {
        let (dir, f) = crate::disk::temp_rw_file(len);
        (dir, Arc::new(f))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Pieces of a file put in any order, from several threads, end up
        /// in place once flushed, and nothing is reported filled before it is
        /// written.
        #[test]
        fn pieces_put_in_any_order_land_in_place(
            seed: u64,
            cuts in proptest::collection::vec(1usize..200_000, 1..80),
            order in any::<prop::sample::Index>(),
            threads in 1usize..4,
        ) {
            let total: usize = cuts.iter().sum();
            let data = pseudo_random(total, seed);
            let (_dir, file) = temp_file(total as u64);
            // Every range reported filled is read back at once: it must
            // already hold its bytes.
            let (f, want) = (file.clone(), data.clone());
            let marker = Marker::observed(move |off, len| {
                let (off, len) = (off as usize, len as usize);
                let mut got = vec![0u8; len];
                f.read_exact_at(&mut got, off as u64).unwrap();
                assert!(got == want[off..off + len], "reported filled before written");
            });
            let g = Gather::new(file.clone(), marker, total as u64);
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in &cuts {
                pieces.push((at, data[at..at + c].to_vec()));
                at += c;
            }
            // Mostly in order, as fetches complete, with one piece moved.
            let moved = pieces.remove(order.index(pieces.len()));
            let to = (order.index(pieces.len() + 1) * 7) % (pieces.len() + 1);
            pieces.insert(to, moved);
            let per = pieces.len().div_ceil(threads);
            std::thread::scope(|s| {
                for share in pieces.chunks(per) {
                    let g = &g;
                    s.spawn(move || {
                        for (off, bytes) in share {
                            g.put(*off as u64, bytes.clone()).unwrap();
                        }
                    });
                }
            });
            g.flush().unwrap();
            let mut back = vec![0u8; total];
            file.read_exact_at(&mut back, 0).unwrap();
            prop_assert!(back == data);
        }
    }

    #[test]
    fn a_small_file_is_written_as_soon_as_all_of_it_has_come() {
        let (_dir, file) = temp_file(30);
        let g = Gather::new(file.clone(), Marker::default(), 30);
        g.put(10, vec![2u8; 20]).unwrap();
        let mut b = [0u8; 30];
        file.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, [0u8; 30], "written before all of it came");
        g.put(0, vec![1u8; 10]).unwrap();
        file.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b[..10], &[1u8; 10]);
        assert_eq!(&b[10..], &[2u8; 20]);
        // Nothing is left to write (nor kept in memory).
        assert!(g.pending.lock().unwrap().chunks.is_empty());
    }

    #[test]
    fn chunks_still_gathered_are_written_when_the_pull_lets_go() {
        let (_dir, file) = temp_file(100);
        let g = Gather::new(file.clone(), Marker::default(), 100);
        g.put(40, vec![8u8; 20]).unwrap();
        drop(g);
        let mut b = [0u8; 20];
        file.read_exact_at(&mut b, 40).unwrap();
        assert_eq!(b, [8u8; 20]);
    }

    #[test]
    fn chunks_are_written_once_a_mebibyte_is_gathered_or_at_flush() {
        let (_dir, file) = temp_file(4 << 20);
        let g = Gather::new(file.clone(), Marker::default(), 4 << 20);
        let chunk = vec![9u8; 300_000];
        // Three chunks: under GATHER, nothing written yet.
        for i in 0..3u64 {
            g.put(i * 300_000, chunk.clone()).unwrap();
        }
        let mut back = vec![0u8; 900_000];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(
            back.iter().all(|&b| b == 0),
            "written before the run filled"
        );
        // The fourth passes GATHER: all four go out.
        g.put(900_000, chunk.clone()).unwrap();
        let mut back = vec![0u8; 1_200_000];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 9));
        // Pieces apart, and one that arrives before its neighbour: gathered
        // until flushed, then each in place.
        g.put(3_000_000, vec![6u8; 10]).unwrap();
        g.put(2_000_010, vec![4u8; 10]).unwrap();
        g.put(2_000_000, vec![5u8; 10]).unwrap();
        let mut b = [0u8; 10];
        file.read_exact_at(&mut b, 3_000_000).unwrap();
        assert_eq!(b, [0u8; 10], "written before the run filled");
        g.flush().unwrap();
        for (off, want) in [(2_000_000, 5u8), (2_000_010, 4), (3_000_000, 6)] {
            file.read_exact_at(&mut b, off).unwrap();
            assert_eq!(b, [want; 10]);
        }
    }
}
