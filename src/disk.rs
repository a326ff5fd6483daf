//! Small filesystem helpers that pulls, restores, the scanner and the history
//! store share: durable directories, full reads, reads that never wait on the
//! disk, whole-file hashes, range copies between files, early writeback, free
//! space, and mtimes as the index stores them (nanoseconds since the epoch).

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
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

/// Fills `buf` from `offset` of `file` only if every byte is in the page
/// cache (`preadv2` with `RWF_NOWAIT`), so the call never waits on the disk.
/// `Ok(false)`: some of it is not cached (or the file ends first, or the kernel
/// cannot tell); read it the ordinary way on a thread that may block.
pub fn read_cached_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<bool> {
    let mut done = 0usize;
    while done < buf.len() {
        let iov = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        // SAFETY: the iovec points into `buf`, which outlives the call, and
        // the descriptor is open.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        match n {
            0 => return Ok(false),
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                        Ok(false)
                    }
                    _ => Err(e),
                };
            }
        }
    }
    Ok(true)
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

/// Copies `len` bytes at `src_off` in `src` to `dst_off` in `dst`: in the
/// kernel (`copy_file_range`) where the filesystems allow it, else by reads
/// and writes. Returns the bytes copied, fewer than `len` only if `src` ended
/// first.
pub fn copy_range(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> io::Result<u64> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = (src_off + done) as libc::loff_t;
        let mut off_out = (dst_off + done) as libc::loff_t;
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the duration of the call and
        // the offsets are valid pointers to locals.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        match n {
            0 => break,
            n if n > 0 => done += n as u64,
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        return Ok(done
                            + copy_by_reads(
                                src,
                                src_off + done,
                                dst,
                                dst_off + done,
                                len - done,
                            )?);
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(done)
}

/// Writes `parts` one after another at `offset` in `file`, in as few
/// `pwritev` calls as the kernel allows (at most [`MAX_PARTS`] parts a call).
pub fn write_all_vectored_at(file: &File, parts: &[&[u8]], offset: u64) -> io::Result<()> {
    let mut offset = offset;
    // Where the unwritten bytes start: a part, and an offset into it.
    let (mut part, mut skip) = (0usize, 0usize);
    while part < parts.len() {
        let iov: Vec<libc::iovec> = parts[part..]
            .iter()
            .take(MAX_PARTS)
            .enumerate()
            .map(|(i, p)| {
                let p = if i == 0 { &p[skip..] } else { p };
                libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                }
            })
            .collect();
        // SAFETY: every iovec points into a slice borrowed for the call.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 && iov.iter().any(|v| v.iov_len > 0) {
            return Err(io::ErrorKind::WriteZero.into());
        }
        offset += n as u64;
        (part, skip) = step_over(parts, part, skip, n as usize);
    }
    Ok(())
}

/// Where the unwritten bytes of `parts` start (a part and an offset into
/// it) once `n` more bytes, from part `part` at offset `skip`, are written.
/// A part left with nothing to write is stepped over.
fn step_over(parts: &[&[u8]], mut part: usize, mut skip: usize, n: usize) -> (usize, usize) {
    let mut left = n;
    while part < parts.len() && left >= parts[part].len() - skip {
        left -= parts[part].len() - skip;
        part += 1;
        skip = 0;
    }
    (part, skip + left)
}

/// The most parts [`write_all_vectored_at`] passes to one `pwritev`
/// (the kernel's limit is 1024).
pub const MAX_PARTS: usize = 64;

/// [`copy_range`] through a buffer of at most 1 MiB.
fn copy_by_reads(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = match src.read_at(&mut buf[..want], src_off + done) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all_at(&buf[..n], dst_off + done)?;
        done += n as u64;
    }
    Ok(done)
}

/// Bytes an unprivileged writer may still put on the filesystem holding `path`.
pub fn free_space(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("a path with a NUL byte"))?;
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out
    // pointer for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Bytes written to a file being assembled between two calls to
/// [`start_writeback`], so the final fsync finds little left to do.
pub const WRITEBACK_EVERY: u64 = 16 << 20;

/// Starts writing `file`'s dirty pages to disk without waiting for them, so a
/// later fsync has little left to do. A hint only: the fsync reports errors.
pub fn start_writeback(file: &File) {
    // SAFETY: a plain syscall on an open descriptor.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
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

/// A file `len` bytes long (zeros), open for reading and writing, in a
/// fresh temp dir kept alive by the returned guard.
#[cfg(test)]
pub(crate) fn temp_rw_file(len: u64) -> (tempfile::TempDir, File) {
    let dir = tempfile::tempdir().unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("f"))
        .unwrap();
    f.set_len(len).unwrap();
    (dir, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_read_gives_the_bytes_in_the_page_cache_and_declines_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        // Just written, so cached.
        let mut buf = vec![0u8; 100_000];
        assert!(read_cached_at(&f, &mut buf, 150_000).unwrap());
        assert_eq!(buf, data[150_000..250_000]);
        // Runs past the end: not a whole read.
        assert!(!read_cached_at(&f, &mut buf, 250_000).unwrap());
    }

    #[test]
    fn vectored_writes_put_every_part_in_order_across_several_calls() {
        let (_dir, f) = temp_rw_file(0);
        // More parts than one call takes, some of them empty.
        let data = crate::chunking::pseudo_random(400_000, 9);
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut at = 0;
        for i in 0..3 * MAX_PARTS + 5 {
            let len = (i * 37) % 1500;
            parts.push(&data[at..at + len]);
            at += len;
        }
        write_all_vectored_at(&f, &parts, 11).unwrap();
        let mut back = vec![0u8; at];
        f.read_exact_at(&mut back, 11).unwrap();
        assert_eq!(back, data[..at]);
        assert_eq!(f.metadata().unwrap().len(), 11 + at as u64);
    }

    #[test]
    fn a_short_write_resumes_inside_the_part_it_stopped_in() {
        let (a, b, c) = ([1u8; 10], [2u8; 0], [3u8; 5]);
        let parts: Vec<&[u8]> = vec![&a, &b, &c];
        // Into the first part, to its end (the empty one is stepped over too),
        // into the last, and all of it.
        assert_eq!(step_over(&parts, 0, 0, 4), (0, 4));
        assert_eq!(step_over(&parts, 0, 4, 6), (2, 0));
        assert_eq!(step_over(&parts, 2, 0, 3), (2, 3));
        assert_eq!(step_over(&parts, 0, 0, 15), (3, 0));
        assert_eq!(step_over(&parts, 0, 3, 0), (0, 3));
    }

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
    fn ranges_copy_exactly_and_stop_at_the_end_of_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let data = crate::chunking::pseudo_random(3 << 20, 4);
        std::fs::write(dir.path().join("src"), &data).unwrap();
        let src = File::open(dir.path().join("src")).unwrap();
        let (out_dir, dst) = temp_rw_file(4 << 20);
        assert_eq!(copy_range(&src, 100, &dst, 7, 2 << 20).unwrap(), 2 << 20);
        assert_eq!(copy_by_reads(&src, 5, &dst, 3 << 20, 1000).unwrap(), 1000);
        // Past the source's end: only what there is.
        let end = (3 << 20) + 2000;
        assert_eq!(
            copy_range(&src, (3 << 20) - 10, &dst, end, 100).unwrap(),
            10
        );
        let out = std::fs::read(out_dir.path().join("f")).unwrap();
        assert_eq!(&out[7..7 + (2 << 20)], &data[100..100 + (2 << 20)]);
        assert_eq!(&out[3 << 20..(3 << 20) + 1000], &data[5..1005]);
        assert_eq!(
            &out[end as usize..end as usize + 10],
            &data[(3 << 20) - 10..]
        );
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
