//! Local versions, for folders with `history.local`: the agent captures the
//! chunks of every file version the scanner records into the chunk store
//! ([`capture`]), so that when a later local edit or delete replaces that
//! version, the scanner's transaction can keep it in the history (reason
//! `local`) without reading anything: its bytes are already stored. GC keeps
//! the chunks of such folders' live files.
//!
//! A version replaced before it was captured (edited again within moments)
//! cannot be kept: its bytes are gone.

use std::fs::OpenOptions;
use std::io::{BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;

use super::Result;
use super::restore::check_layout;
use super::store::{ChunkStore, StoreError};
use crate::index::{Folder, Index};

/// What a capture pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureReport {
    /// Files whose chunks are now all in the store.
    pub files: u64,
    /// Bytes new to the store.
    pub bytes_written: u64,
    /// Files that changed since they were recorded (the next scan records
    /// them, and a later pass captures that version).
    pub changed: u64,
}

/// Captures the files of `folder` recorded after sequence `after` whose
/// chunks are not all stored. Returns the sequence to pass next time.
pub fn capture(
    index: &mut Index,
    store: &ChunkStore,
    folder: &Folder,
    after: i64,
    stop: &dyn Fn() -> bool,
) -> Result<(i64, CaptureReport)> {
    let mut report = CaptureReport::default();
    let candidates = index.capture_candidates(folder.row, after)?;
    let mut next = after;
    if candidates.is_empty() {
        return Ok((next, report));
    }
    let mut writer = store.writer()?;
    for c in candidates {
        if stop() {
            break;
        }
        next = next.max(c.sequence);
        let path = c.path.to_fs(&folder.path);
        if check_layout(&c.chunks, c.size).is_err() {
            continue;
        }
        // O_NOFOLLOW: a file swapped for a link since is not read through it.
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        else {
            report.changed += 1;
            continue;
        };
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut buf = Vec::new();
        let mut intact = true;
        for ch in &c.chunks {
            buf.resize(ch.len as usize, 0);
            if r.read_exact(&mut buf).is_err() {
                intact = false;
                break;
            }
            match writer.put(index, &ch.hash, &buf) {
                Ok(_) => {}
                Err(StoreError::HashMismatch { .. }) => {
                    intact = false;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if intact {
            report.files += 1;
        } else {
            report.changed += 1;
        }
    }
    report.bytes_written = writer.finish(index)?.bytes_written;
    Ok((next, report))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::history::ingest::tests::fixture;
    use crate::index::{HistoryReason, LocalHistory};
    use crate::relpath::RelPath;

    #[test]
    fn a_captured_version_is_kept_when_a_local_edit_replaces_it_and_gc_keeps_it_until_then() {
        let mut f = fixture();
        f.index.set_local_history(LocalHistory {
            default: true,
            folders: HashMap::new(),
        });
        let v1 = vec![7u8; 200_000];
        f.record("a.txt", &v1);
        let (seq, r) = capture(&mut f.index, &f.store, &f.folder, 0, &|| false).unwrap();
        assert_eq!((r.files, r.changed), (1, 0));
        assert!(seq > 0);
        // Nothing to do the second time.
        let (_, r) = capture(&mut f.index, &f.store, &f.folder, seq, &|| false).unwrap();
        assert_eq!(r.files, 0);
        // GC keeps the chunks of a live file of a local-history folder.
        f.store.gc(&mut f.index).unwrap();
        assert!(f.store.stats(&f.index).unwrap().chunks > 0);

        f.record("a.txt", b"edited");
        let a = RelPath::new("a.txt").unwrap();
        let list = f.index.history_of(f.folder.row, Some(&a), false).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].reason, HistoryReason::Local);
        assert_eq!(f.restore_bytes(list[0].id), v1);
    }

    #[test]
    fn a_file_changed_since_it_was_recorded_is_not_captured() {
        let mut f = fixture();
        f.record("a.txt", &[1u8; 100_000]);
        std::fs::write(f.folder.path.join("a.txt"), [2u8; 100_000]).unwrap();
        let (_, r) = capture(&mut f.index, &f.store, &f.folder, 0, &|| false).unwrap();
        assert_eq!((r.files, r.changed), (0, 1));
    }
}
