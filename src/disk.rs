//! Small filesystem helpers that pulls, restores, the scanner and the history
//! store share: durable directories, full reads, whole-file hashes, and
//! mtimes as the index stores them (nanoseconds since the epoch).

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Fsyncs a directory, so renames and deletes in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The blake3 hash of the file at `path` (about `size` bytes), read in blocks
/// of up to 4 MiB each hashed on all cores: fast, and memory stays flat
/// whatever the size (a memory map would count the whole file in the
/// process's resident memory).
pub fn hash_file(path: &Path, size: u64) -> io::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; (size as usize).clamp(1, 4 << 20)];
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update_rayon(&buf[..n]);
    }
    Ok(hasher.finalize())
}

/// A file's mtime in nanoseconds since the epoch.
pub fn mtime_ns(m: &Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec()
}

/// The time `ns` nanoseconds from the epoch (negative: before it).
pub fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_nanoseconds() {
        for ns in [0, 1, 1_500_000_000_123_456_789, -2_000_000_001] {
            let t = system_time(ns);
            let back = match t.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => d.as_nanos() as i64,
                Err(e) => -(e.duration().as_nanos() as i64),
            };
            assert_eq!(back, ns);
        }
    }

    #[test]
    fn a_file_hashes_as_its_bytes_do() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data = crate::chunking::pseudo_random(5 << 20, 9);
        std::fs::write(&p, &data).unwrap();
        assert_eq!(
            hash_file(&p, data.len() as u64).unwrap(),
            blake3::hash(&data)
        );
    }
}
