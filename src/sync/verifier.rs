//! The whole-file hash of a file being assembled, computed while it fills:
//! writers report each range they have written, and a thread hashes the
//! filled prefix as it grows (reading it back from the page cache), so that
//! once the last chunk is in, the check has little left to do and runs beside
//! the fsync instead of after it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

/// Bytes read back and hashed at a time; a full buffer (a backlog) is hashed
/// on all cores.
const READ: usize = 4 << 20;

/// The thread sleeps until this much more is filled (or the file is done):
/// waking it for every chunk written (about 13,000 per GiB) cost a futex
/// wake and a context switch each on the receiving side, which is CPU-bound
/// while a large file streams in.
const WAKE_EVERY: u64 = 2 << 20;

/// Hashes a file of known size as its ranges are reported filled.
pub struct Verifier {
    marker: Marker,
    thread: Option<JoinHandle<io::Result<blake3::Hash>>>,
}

/// Reports written ranges to a [`Verifier`]; cheap to clone. An inert one
/// (for files checked some other way) ignores them.
#[derive(Clone, Default)]
pub struct Marker(Option<Arc<Shared>>);

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Tests: called with every range reported filled, before it counts.
    #[cfg(test)]
    observe: Option<Box<dyn Fn(u64, u64) + Send + Sync>>,
}

#[derive(Default)]
struct State {
    /// Every byte before this has been written.
    filled: u64,
    /// Written ranges beyond `filled` (start to end), not yet joined to it.
    ahead: BTreeMap<u64, u64>,
    /// No more ranges will come (the file is complete, or given up on).
    done: bool,
    /// Given up on: the thread stops without a hash.
    abandoned: bool,
    /// The thread sleeps until `filled` reaches this.
    wake_at: Option<u64>,
}

impl Verifier {
    /// Starts hashing `file`, `size` bytes long, as it fills.
    pub fn start(file: Arc<File>, size: u64) -> io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-verify".into())
            .spawn(move || follow(&s, &file, size))?;
        Ok(Self {
            marker: Marker(Some(shared)),
            thread: Some(thread),
        })
    }

    /// A handle writers report their ranges through.
    pub fn marker(&self) -> Marker {
        self.marker.clone()
    }

    /// Waits for the hash of the whole file as it now is: every range should
    /// have been reported; one that was not is read as it stands.
    pub fn finish(mut self) -> io::Result<blake3::Hash> {
        self.marker.update(|s| s.done = true);
        self.thread
            .take()
            .expect("finish runs once")
            .join()
            .map_err(|_| io::Error::other("the verify thread panicked"))?
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        if self.thread.is_some() {
            // Given up on (an error on the way): the thread exits at its next
            // wake-up; nothing waits for it.
            self.marker.update(|s| {
                s.done = true;
                s.abandoned = true;
            });
        }
    }
}

impl Marker {
    /// Records that `len` bytes at `offset` are written.
    pub fn filled(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        #[cfg(test)]
        if let Some(observe) = self.0.as_ref().and_then(|s| s.observe.as_ref()) {
            observe(offset, len);
        }
        self.update(|s| {
            let end = offset + len;
            let e = s.ahead.entry(offset).or_insert(end);
            *e = (*e).max(end);
            while let Some((&start, &end)) = s.ahead.first_key_value() {
                if start > s.filled {
                    break;
                }
                s.filled = s.filled.max(end);
                s.ahead.pop_first();
            }
        });
    }

    /// Tests: a marker that calls `observe` with every range reported
    /// filled (and hashes nothing).
    #[cfg(test)]
    pub fn observed(observe: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        Marker(Some(Arc::new(Shared {
            observe: Some(Box::new(observe)),
            ..Shared::default()
        })))
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        if let Some(shared) = &self.0 {
            let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut state);
            let wake = state.done || state.wake_at.is_some_and(|w| state.filled >= w);
            if wake {
                state.wake_at = None;
            }
            drop(state);
            if wake {
                shared.changed.notify_all();
            }
        }
    }
}

/// The thread: hashes the filled prefix as it grows, to `size`.
fn follow(shared: &Shared, file: &File, size: u64) -> io::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; (size as usize).clamp(1, READ)];
    let mut hashed = 0u64;
    while hashed < size {
        let upto = {
            let want = (hashed + WAKE_EVERY).min(size);
            let mut s = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            while s.filled < want && !s.done {
                s.wake_at = Some(want);
                s = shared
                    .changed
                    .wait(s)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if s.abandoned {
                return Err(io::Error::other("abandoned"));
            }
            // Done: the rest is hashed as it is, gaps and all (a chunk list
            // that left one gives a hash that does not match).
            if s.done { size } else { s.filled.min(size) }
        };
        while hashed < upto {
            let n = ((upto - hashed) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], hashed)?;
            if n == READ {
                hasher.update_rayon(&buf[..n]);
            } else {
                hasher.update(&buf[..n]);
            }
            hashed += n as u64;
        }
    }
    Ok(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::pseudo_random;

    fn temp_file(len: usize) -> (tempfile::TempDir, Arc<File>) {
        let (dir, f) = crate::disk::temp_rw_file(len as u64);
        (dir, Arc::new(f))
    }

    #[test]
    fn ranges_written_out_of_order_give_the_hash_of_the_whole_file() {
        let data = pseudo_random(9 << 20, 7);
        let (_dir, file) = temp_file(data.len());
        let v = Verifier::start(file.clone(), data.len() as u64).unwrap();
        // Every other piece first (nothing to hash yet), then the gaps (the
        // prefix grows as each lands), and the first one again.
        let mut cuts: Vec<usize> = (0..data.len()).step_by(700_001).collect();
        cuts.push(data.len());
        let pieces: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
        let m = v.marker();
        let order = pieces.iter().skip(1).step_by(2);
        let order = order
            .chain(pieces.iter().step_by(2))
            .chain(pieces.iter().take(1));
        for &(a, b) in order {
            file.write_all_at(&data[a..b], a as u64).unwrap();
            m.filled(a as u64, (b - a) as u64);
        }
        assert_eq!(v.finish().unwrap(), blake3::hash(&data));
    }

    #[test]
    fn a_gap_left_unwritten_is_hashed_as_it_stands_not_waited_for() {
        let (_dir, file) = temp_file(1000);
        file.write_all_at(&[7u8; 1000], 0).unwrap();
        let v = Verifier::start(file, 1000).unwrap();
        v.marker().filled(0, 400);
        v.marker().filled(500, 500);
        assert_eq!(v.finish().unwrap(), blake3::hash(&[7u8; 1000]));
    }
}
