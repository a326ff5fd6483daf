//! The folder scanner on real directories and a real SQLite index: what each kind
//! of change on disk leaves in the index.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::Device;
use ferry::chunking::{DEFAULT_PARAMS, FileHash, chunk_bytes};
use ferry::folder::FolderError;
use ferry::index::{FileKind, FileRecord};
use ferry::relpath::RelPath;
use ferry::scan::{self, NoProgress, ScanError, ScanOptions, ScanProgress, ScanReport};
use ferry::version_vector::Relation;

fn scan_with(
    d: &mut Device,
    opts: &ScanOptions,
    progress: &dyn ScanProgress,
) -> Result<ScanReport, ScanError> {
    let me = d.me();
    scan::scan(&mut d.index, &d.folder, me, opts, progress)
}

fn scan(d: &mut Device) -> ScanReport {
    let report = scan_with(d, &ScanOptions::default(), &NoProgress).expect("scan");
    assert!(report.issues.is_empty(), "{:?}", report.issues);
    assert!(report.changing.is_empty(), "{:?}", report.changing);
    report
}

/// The live record at `rel`; fails the test if there is none or it is a tombstone.
fn live(d: &Device, rel: &str) -> FileRecord {
    let r = d
        .record(rel)
        .unwrap_or_else(|| panic!("{rel} is not indexed"));
    assert!(!r.deleted, "{rel} is a tombstone");
    r
}

fn hash_of(bytes: &[u8]) -> Option<FileHash> {
    Some(blake3::hash(bytes).into())
}

fn rel(s: &str) -> RelPath {
    RelPath::new(s).expect("valid path")
}

/// Checks that the index holds `bytes` at `path`: whole-file hash, size, and
/// chunks that tile the file exactly, each with the hash of its bytes.
fn assert_content(d: &Device, path: &str, bytes: &[u8]) {
    let r = live(d, path);
    assert_eq!(r.meta.kind, FileKind::File, "{path}");
    assert_eq!(r.meta.size, bytes.len() as u64, "{path}");
    assert_eq!(r.hash, hash_of(bytes), "{path}");
    let chunks = d.index.file_chunks(d.folder.row, &rel(path)).unwrap();
    assert_eq!(r.chunk_count, chunks.len() as u64, "{path}");
    let mut offset = 0u64;
    for c in &chunks {
        assert_eq!(c.offset, offset, "{path}: chunks leave a gap or overlap");
        let end = (c.offset + u64::from(c.len)) as usize;
        assert!(end <= bytes.len(), "{path}: a chunk runs past the end");
        let expected: FileHash = blake3::hash(&bytes[c.offset as usize..end]).into();
        assert_eq!(c.hash.0, expected.0, "{path}: chunk at {offset}");
        offset += u64::from(c.len);
    }
    assert_eq!(
        offset,
        bytes.len() as u64,
        "{path}: chunks do not reach the end"
    );
}

/// Asserts that `after` is a later local version of `before`.
fn assert_bumped(d: &Device, before: &FileRecord, after: &FileRecord) {
    assert_eq!(
        after.version.compare(&before.version),
        Relation::Newer,
        "{}: {:?} -> {:?}",
        after.path,
        before.version,
        after.version
    );
    assert_eq!(after.version.get(d.me()), before.version.get(d.me()) + 1);
    assert!(after.sequence > before.sequence, "{}", after.path);
    assert_eq!(after.modified_by, d.me());
}

fn paths(records: &[FileRecord]) -> BTreeSet<String> {
    records.iter().map(|r| r.path.to_string()).collect()
}

fn set_mtime(path: &Path, t: SystemTime) {
    File::open(path).unwrap().set_modified(t).unwrap();
}

fn at(secs: u64, nanos: u32) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
}

fn ns(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as i64
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic incompressible bytes (splitmix64).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn append(path: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

#[test]
fn new_files_dirs_and_nested_files_are_recorded_with_their_hashes_and_chunks() {
    let mut d = Device::with_folder();
    let small = b"hello, ferry\n".to_vec();
    let deep = pseudo_random(300 * 1024, 1);
    d.write("a.txt", &small);
    d.write("empty.txt", b"");
    d.write("docs/nested/deep.bin", &deep);
    fs::create_dir(d.path("emptydir")).unwrap();

    let report = scan(&mut d);

    assert_eq!(report.new, 6, "{report:?}");
    assert_eq!((report.changed, report.deleted), (0, 0));
    assert_eq!(report.hashed_files, 3);
    assert_eq!(report.hashed_bytes, (small.len() + deep.len()) as u64);
    let records = d.records();
    assert_eq!(
        paths(&records),
        [
            "a.txt",
            "docs",
            "docs/nested",
            "docs/nested/deep.bin",
            "empty.txt",
            "emptydir"
        ]
        .map(String::from)
        .into(),
        "the .ferry marker must not be indexed"
    );
    assert_content(&d, "a.txt", &small);
    assert_content(&d, "empty.txt", b"");
    assert_content(&d, "docs/nested/deep.bin", &deep);
    assert!(live(&d, "docs/nested/deep.bin").chunk_count > 1);
    for dir in ["docs", "docs/nested", "emptydir"] {
        let r = live(&d, dir);
        assert_eq!(r.meta.kind, FileKind::Dir);
        assert_eq!((r.hash, r.chunk_count), (None, 0));
    }
    for r in &records {
        assert!(!r.deleted);
        assert_eq!(r.version.get(d.me()), 1, "{}", r.path);
        assert_eq!(r.version.iter().count(), 1, "{}", r.path);
        assert_eq!(r.modified_by, d.me());
        let m = fs::symlink_metadata(d.path(r.path.as_str())).unwrap();
        assert_eq!(r.meta.inode, m.ino());
        assert_eq!(r.meta.permissions, m.mode() & 0o7777);
    }
    let mut seqs: Vec<i64> = records.iter().map(|r| r.sequence).collect();
    seqs.sort();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
    let folder = d.folder_now();
    assert_eq!(folder.sequence, 6);
    assert_eq!(folder.error, None);
    assert!(folder.last_scan_at.is_some());
    let stats = d.index.folder_stats(d.folder.row).unwrap();
    assert_eq!((stats.files, stats.dirs, stats.symlinks), (3, 3, 0));
    assert_eq!(stats.bytes, (small.len() + deep.len()) as u64);
    assert_eq!(stats.deleted, 0);
}

#[test]
fn modified_content_gets_a_new_hash_a_newer_version_and_a_higher_sequence() {
    let mut d = Device::with_folder();
    d.write("a.txt", b"hello world");
    d.write("other.txt", b"untouched");
    // Explicit mtimes: a same-size edit within one timestamp tick would be invisible.
    set_mtime(&d.path("a.txt"), at(1_700_000_000, 0));
    scan(&mut d);
    let before = live(&d, "a.txt");
    let other = live(&d, "other.txt");

    d.write("a.txt", b"HELLO WORLD");
    set_mtime(&d.path("a.txt"), at(1_700_000_100, 0));
    let report = scan(&mut d);

    assert_eq!((report.new, report.changed, report.deleted), (0, 1, 0));
    assert_eq!(report.hashed_files, 1);
    let after = live(&d, "a.txt");
    assert_ne!(after.hash, before.hash);
    assert_content(&d, "a.txt", b"HELLO WORLD");
    assert_bumped(&d, &before, &after);
    assert_eq!(d.folder_now().sequence, after.sequence);
    assert_eq!(live(&d, "other.txt"), other);
}

#[test]
fn a_large_file_edited_mid_way_is_recut_from_its_old_chunk_list_into_the_chunks_a_fresh_scan_gives()
{
    let mut d = Device::with_folder();
    let data = pseudo_random(12 << 20, 21);
    d.write("big.bin", &data);
    set_mtime(&d.path("big.bin"), at(1_700_000_000, 0));
    assert_eq!(
        scan(&mut d).reused_chunks,
        0,
        "nothing to reuse the first time"
    );

    let mut edited = data.clone();
    edited.splice(6 << 20..6 << 20, [7u8; 100]);
    d.write("big.bin", &edited);
    set_mtime(&d.path("big.bin"), at(1_700_000_100, 0));
    let report = scan(&mut d);

    assert_eq!((report.new, report.changed, report.hashed_files), (0, 1, 1));
    assert_content(&d, "big.bin", &edited);
    let fresh = chunk_bytes(&edited, DEFAULT_PARAMS).chunks;
    assert_eq!(
        d.index.file_chunks(d.folder.row, &rel("big.bin")).unwrap(),
        fresh,
        "the same cut points as a scan without the old list"
    );
    // All but the chunks around the insert and near the end, where no old
    // chunk had a full window after it, come from the old list.
    let reused = report.reused_chunks as usize;
    assert!(
        reused + 10 >= fresh.len() && reused < fresh.len(),
        "{reused} of {} chunks reused",
        fresh.len()
    );
}

/// A large file hashed ahead of the scan (while the watcher's debounce runs)
/// is not read again by the scan when it still shows the state it was hashed
/// in; the index gets what a scan of its own would have recorded.
#[test]
fn a_file_hashed_ahead_is_taken_by_the_scan_only_while_it_shows_the_same_state() {
    let mut d = Device::with_folder();
    let data = pseudo_random(12 << 20, 5);
    d.write("big.bin", &data);
    d.write("small.txt", b"small");
    set_mtime(&d.path("big.bin"), at(1_700_000_000, 0));
    scan(&mut d);

    let ahead = Arc::new(scan::Prehashed::default());
    let never = || false;
    let paths = [rel("big.bin"), rel("small.txt"), rel("gone.bin")];
    let hash_ahead =
        |d: &Device| scan::prehash(&d.index, &d.folder, &paths, DEFAULT_PARAMS, &ahead, &never);
    let put = |d: &Device, name: &str, bytes: &[u8], secs: u64| {
        d.write(name, bytes);
        set_mtime(&d.path(name), at(secs, 0));
    };
    let flipped = |bytes: &[u8], at: usize| {
        let mut v = bytes.to_vec();
        v[at] ^= 0xff;
        v
    };
    // As the index has them, small, or missing: nothing to do.
    assert_eq!(hash_ahead(&d), 0);

    let mut edited = data.clone();
    edited.splice(6 << 20..6 << 20, [7u8; 100]);
    put(&d, "big.bin", &edited, 1_700_000_100);
    assert_eq!(hash_ahead(&d), 1);
    let opts = ScanOptions {
        prehashed: Some(ahead.clone()),
        ..ScanOptions::default()
    };
    let report = scan_with(&mut d, &opts, &NoProgress).unwrap();
    assert_eq!(
        (report.changed, report.hashed_files, report.prehashed_files),
        (1, 1, 1)
    );
    assert_content(&d, "big.bin", &edited);
    assert_eq!(
        d.index.file_chunks(d.folder.row, &rel("big.bin")).unwrap(),
        chunk_bytes(&edited, DEFAULT_PARAMS).chunks,
        "the cut points a scan of its own gives"
    );
    assert!(
        report.reused_chunks > 0,
        "the old list helped hashing ahead"
    );

    // Changed again after it was hashed ahead: the scan reads it itself.
    let again = flipped(&edited, 1 << 20);
    put(&d, "big.bin", &again, 1_700_000_200);
    assert_eq!(hash_ahead(&d), 1);
    let last = flipped(&again, 2 << 20);
    put(&d, "big.bin", &last, 1_700_000_400);
    let report = scan_with(&mut d, &opts, &NoProgress).unwrap();
    assert_eq!(
        (report.changed, report.hashed_files, report.prehashed_files),
        (1, 1, 0)
    );
    assert_content(&d, "big.bin", &last);

    // Swapped for another file of the same size and mtime (a new inode):
    // not taken either.
    let swapped = flipped(&last, 3 << 20);
    put(&d, "big.bin", &swapped, 1_700_000_500);
    assert_eq!(hash_ahead(&d), 1);
    let other = flipped(&swapped, 4 << 20);
    put(&d, "big.new", &other, 1_700_000_500);
    fs::rename(d.path("big.new"), d.path("big.bin")).unwrap();
    let report = scan_with(&mut d, &opts, &NoProgress).unwrap();
    assert_eq!(report.prehashed_files, 0);
    assert_content(&d, "big.bin", &other);
}

/// Hashing ahead skips ignored files, stops when told, and stores nothing
/// once the cache was cleared while it ran (the watcher saw the file change
/// again, or a scan ran).
#[test]
fn hashing_ahead_skips_ignored_files_stops_when_told_and_stores_nothing_after_a_clear() {
    let mut d = Device::with_folder();
    d.write(".ferryignore", b"*.img\n");
    d.write("vm.img", &pseudo_random(8 << 20, 1));
    d.write("big.bin", &pseudo_random(8 << 20, 2));
    scan(&mut d);
    d.write("vm.img", &pseudo_random(8 << 20, 3));
    d.write("big.bin", &pseudo_random(8 << 20, 4));
    set_mtime(&d.path("big.bin"), at(1_700_000_000, 0));
    let paths = [rel("vm.img"), rel("big.bin")];
    let ahead = scan::Prehashed::default();

    let stopped = || true;
    assert_eq!(
        scan::prehash(
            &d.index,
            &d.folder,
            &paths,
            DEFAULT_PARAMS,
            &ahead,
            &stopped
        ),
        0
    );
    // Cleared while it reads (the check for a stop is called on every read).
    let cleared = std::sync::atomic::AtomicBool::new(false);
    let clear_once = || {
        if !cleared.swap(true, std::sync::atomic::Ordering::SeqCst) {
            ahead.clear();
        }
        false
    };
    assert_eq!(
        scan::prehash(
            &d.index,
            &d.folder,
            &paths,
            DEFAULT_PARAMS,
            &ahead,
            &clear_once
        ),
        0
    );
    assert!(cleared.load(std::sync::atomic::Ordering::SeqCst));
    let never = || false;
    assert_eq!(
        scan::prehash(&d.index, &d.folder, &paths, DEFAULT_PARAMS, &ahead, &never),
        1,
        "big.bin only: vm.img is ignored"
    );
}

#[test]
fn an_mtime_only_change_keeps_the_hash_and_bumps_the_version() {
    let mut d = Device::with_folder();
    d.write("a.txt", b"same bytes");
    set_mtime(&d.path("a.txt"), at(1_700_000_000, 0));
    scan(&mut d);
    let before = live(&d, "a.txt");
    let chunks_before = d.index.file_chunks(d.folder.row, &rel("a.txt")).unwrap();

    let later = at(1_700_000_100, 123_456_789);
    set_mtime(&d.path("a.txt"), later);
    let report = scan(&mut d);

    assert_eq!((report.new, report.changed, report.deleted), (0, 1, 0));
    let after = live(&d, "a.txt");
    assert_eq!(after.hash, before.hash);
    assert_eq!(after.meta.mtime_ns, ns(later));
    assert_bumped(&d, &before, &after);
    assert_eq!(
        d.index.file_chunks(d.folder.row, &rel("a.txt")).unwrap(),
        chunks_before
    );
}

#[test]
fn a_rescan_without_changes_hashes_nothing_and_changes_nothing() {
    let mut d = Device::with_folder();
    d.write("a.txt", b"a");
    d.write("dir/b.bin", &pseudo_random(100_000, 2));
    symlink("a.txt", d.path("link")).unwrap();
    scan(&mut d);
    let records = d.records();
    let snapshot = d.index.scan_snapshot(d.folder.row).unwrap();
    let sequence = d.folder_now().sequence;

    let report = scan(&mut d);

    assert_eq!(
        report,
        ScanReport {
            entries: 4,
            ..Default::default()
        }
    );
    assert_eq!(d.records(), records);
    assert_eq!(d.index.scan_snapshot(d.folder.row).unwrap(), snapshot);
    assert_eq!(d.folder_now().sequence, sequence);
}

#[test]
fn a_deleted_file_becomes_a_tombstone_with_a_newer_version() {
    let mut d = Device::with_folder();
    d.write("a.txt", b"doomed");
    d.write("b.txt", b"stays");
    scan(&mut d);
    let before = live(&d, "a.txt");
    let b = live(&d, "b.txt");

    fs::remove_file(d.path("a.txt")).unwrap();
    let report = scan(&mut d);

    assert_eq!((report.new, report.changed, report.deleted), (0, 0, 1));
    let tomb = d.record("a.txt").unwrap();
    assert!(tomb.deleted);
    assert_eq!((tomb.hash, tomb.chunk_count), (None, 0));
    assert!(
        d.index
            .file_chunks(d.folder.row, &rel("a.txt"))
            .unwrap()
            .is_empty()
    );
    assert_bumped(&d, &before, &tomb);
    assert_eq!(live(&d, "b.txt"), b);
    let stats = d.index.folder_stats(d.folder.row).unwrap();
    assert_eq!((stats.files, stats.deleted), (1, 1));

    // A tombstone is not deleted again…
    let report = scan(&mut d);
    assert_eq!(report.deleted, 0);
    assert_eq!(d.record("a.txt").unwrap(), tomb);

    // …and the file coming back continues its history.
    d.write("a.txt", b"back again");
    let report = scan(&mut d);
    assert_eq!(report.new, 1);
    let back = live(&d, "a.txt");
    assert_bumped(&d, &tomb, &back);
    assert_content(&d, "a.txt", b"back again");
}

#[test]
fn a_deleted_directory_tombstones_everything_under_it() {
    let mut d = Device::with_folder();
    d.write("dir/x.txt", b"x");
    d.write("dir/sub/y.txt", b"y");
    fs::create_dir(d.path("dir/sub/empty")).unwrap();
    d.write(
        "dirt.txt",
        b"a sibling whose name starts like the directory",
    );
    scan(&mut d);
    let before = d.records();

    fs::remove_dir_all(d.path("dir")).unwrap();
    let report = scan(&mut d);

    assert_eq!(report.deleted, 5, "{report:?}");
    for old in &before {
        let now = d.record(old.path.as_str()).unwrap();
        if old.path.starts_with(&rel("dir")) {
            assert!(now.deleted, "{} was not tombstoned", old.path);
            assert_bumped(&d, old, &now);
        } else {
            assert_eq!(&now, old);
        }
    }
}

#[test]
fn a_rename_tombstones_the_old_path_and_records_the_same_hash_at_the_new_one() {
    let mut d = Device::with_folder();
    let bytes = pseudo_random(200_000, 3);
    d.write("old.bin", &bytes);
    scan(&mut d);
    let before = live(&d, "old.bin");
    let chunks = d.index.file_chunks(d.folder.row, &rel("old.bin")).unwrap();

    fs::create_dir(d.path("sub")).unwrap();
    fs::rename(d.path("old.bin"), d.path("sub/new.bin")).unwrap();
    let report = scan(&mut d);

    assert_eq!((report.new, report.changed, report.deleted), (2, 0, 1));
    let old = d.record("old.bin").unwrap();
    assert!(old.deleted);
    assert_bumped(&d, &before, &old);
    let new = live(&d, "sub/new.bin");
    assert_eq!(new.hash, before.hash);
    assert_eq!(new.meta.inode, before.meta.inode);
    assert_eq!(
        d.index
            .file_chunks(d.folder.row, &rel("sub/new.bin"))
            .unwrap(),
        chunks
    );
}

#[test]
fn a_file_replaced_by_a_directory_becomes_a_directory_record() {
    let mut d = Device::with_folder();
    d.write("thing", &pseudo_random(100_000, 4));
    scan(&mut d);
    let before = live(&d, "thing");

    fs::remove_file(d.path("thing")).unwrap();
    d.write("thing/inner.txt", b"inside");
    let report = scan(&mut d);

    assert_eq!(report.deleted, 0, "{report:?}");
    let now = live(&d, "thing");
    assert_eq!(now.meta.kind, FileKind::Dir);
    assert_eq!((now.hash, now.chunk_count, now.meta.size), (None, 0, 0));
    assert_bumped(&d, &before, &now);
    assert_content(&d, "thing/inner.txt", b"inside");
}

#[test]
fn a_directory_replaced_by_a_file_tombstones_its_children() {
    let mut d = Device::with_folder();
    d.write("thing/a.txt", b"a");
    d.write("thing/b.txt", b"b");
    scan(&mut d);
    let dir = live(&d, "thing");
    let children = [live(&d, "thing/a.txt"), live(&d, "thing/b.txt")];

    fs::remove_dir_all(d.path("thing")).unwrap();
    d.write("thing", b"now a file");
    let report = scan(&mut d);

    assert_eq!(report.deleted, 2, "{report:?}");
    let now = live(&d, "thing");
    assert_eq!(now.meta.kind, FileKind::File);
    assert_content(&d, "thing", b"now a file");
    assert_bumped(&d, &dir, &now);
    for old in &children {
        let tomb = d.record(old.path.as_str()).unwrap();
        assert!(tomb.deleted, "{}", old.path);
        assert_bumped(&d, old, &tomb);
    }
}

#[test]
fn a_symlink_is_recorded_with_its_target_and_never_followed() {
    let mut d = Device::with_folder();
    let outside = d.tmp.path().join("outside");
    fs::create_dir_all(outside.join("sub")).unwrap();
    fs::write(outside.join("secret.txt"), b"not in the folder").unwrap();
    fs::write(outside.join("sub/more.txt"), b"nor this").unwrap();
    d.write("a.txt", b"a");
    symlink(&outside, d.path("to-outside")).unwrap();
    symlink(outside.join("secret.txt"), d.path("to-secret")).unwrap();
    symlink("a.txt", d.path("relative")).unwrap();
    symlink("nowhere", d.path("dangling")).unwrap();

    let report = scan(&mut d);

    assert_eq!(report.hashed_files, 1, "only a.txt is read: {report:?}");
    assert_eq!(
        paths(&d.records()),
        ["a.txt", "dangling", "relative", "to-outside", "to-secret"]
            .map(String::from)
            .into()
    );
    for (link, target) in [
        ("to-outside", outside.to_str().unwrap().to_owned()),
        (
            "to-secret",
            outside.join("secret.txt").to_str().unwrap().to_owned(),
        ),
        ("relative", "a.txt".to_owned()),
        ("dangling", "nowhere".to_owned()),
    ] {
        let r = live(&d, link);
        assert_eq!(r.meta.kind, FileKind::Symlink, "{link}");
        assert_eq!(r.symlink_target.as_deref(), Some(target.as_str()), "{link}");
        assert_eq!((r.hash, r.chunk_count), (None, 0), "{link}");
    }
    let stats = d.index.folder_stats(d.folder.row).unwrap();
    assert_eq!((stats.files, stats.symlinks), (1, 4));
    assert_eq!(stats.bytes, 1, "a symlinked file's bytes are not counted");
}

#[test]
fn a_retargeted_symlink_is_a_change() {
    let mut d = Device::with_folder();
    symlink("a", d.path("link")).unwrap();
    scan(&mut d);
    let before = live(&d, "link");

    fs::remove_file(d.path("link")).unwrap();
    symlink("b", d.path("link")).unwrap();
    let report = scan(&mut d);

    assert_eq!((report.new, report.changed, report.deleted), (0, 1, 0));
    let after = live(&d, "link");
    assert_eq!(after.symlink_target.as_deref(), Some("b"));
    assert_bumped(&d, &before, &after);
}

#[test]
fn ignored_paths_are_never_indexed() {
    let mut d = Device::with_folder();
    d.write(".ferryignore", b"*.log\nbuild/\n!keep.log\n");
    d.write("a.txt", b"a");
    d.write("debug.log", b"noise");
    d.write("keep.log", b"wanted");
    d.write("sub/trace.log", b"noise");
    d.write("sub/keep.log", b"wanted");
    d.write("build/out.o", b"artefact");
    d.write("sub/build/deep/x.o", b"artefact");
    d.write(
        "other/build",
        b"a file named build is not a build/ directory",
    );

    let report = scan(&mut d);

    assert_eq!(
        paths(&d.records()),
        [
            ".ferryignore",
            "a.txt",
            "keep.log",
            "other",
            "other/build",
            "sub",
            "sub/keep.log"
        ]
        .map(String::from)
        .into()
    );
    assert_eq!(report.hashed_files, 5, "ignored files are not even read");
}

#[test]
fn a_file_that_becomes_ignored_is_not_tombstoned() {
    let mut d = Device::with_folder();
    d.write("a.txt", b"a");
    d.write("debug.log", b"first");
    d.write("build/out.o", b"artefact");
    scan(&mut d);
    let before = d.records();

    d.write(".ferryignore", b"*.log\nbuild/\n");
    let report = scan(&mut d);
    assert_eq!((report.new, report.deleted), (1, 0), "{report:?}");
    for old in &before {
        assert_eq!(d.record(old.path.as_str()).as_ref(), Some(old));
    }

    // Changes to ignored paths, deletes included, are not recorded either.
    d.write("debug.log", b"second, longer");
    fs::remove_file(d.path("build/out.o")).unwrap();
    let report = scan(&mut d);
    assert_eq!(
        (
            report.new,
            report.changed,
            report.deleted,
            report.hashed_files
        ),
        (0, 0, 0, 0)
    );
    for old in &before {
        assert_eq!(d.record(old.path.as_str()).as_ref(), Some(old));
    }
}

#[test]
fn a_permission_change_is_recorded_without_rehashing() {
    let mut d = Device::with_folder();
    d.write("a.txt", b"mode bits");
    fs::create_dir(d.path("dir")).unwrap();
    chmod(&d.path("a.txt"), 0o644);
    chmod(&d.path("dir"), 0o755);
    scan(&mut d);
    let file = live(&d, "a.txt");
    let dir = live(&d, "dir");
    let chunks = d.index.file_chunks(d.folder.row, &rel("a.txt")).unwrap();

    chmod(&d.path("a.txt"), 0o600);
    chmod(&d.path("dir"), 0o700);
    let report = scan(&mut d);

    assert_eq!(report.hashed_files, 0, "{report:?}");
    assert_eq!((report.new, report.changed, report.deleted), (0, 2, 0));
    let file_now = live(&d, "a.txt");
    assert_eq!(file_now.meta.permissions, 0o600);
    assert_eq!(file_now.hash, file.hash);
    assert_eq!(file_now.meta.mtime_ns, file.meta.mtime_ns);
    assert_bumped(&d, &file, &file_now);
    assert_eq!(
        d.index.file_chunks(d.folder.row, &rel("a.txt")).unwrap(),
        chunks
    );
    let dir_now = live(&d, "dir");
    assert_eq!(dir_now.meta.permissions, 0o700);
    assert_bumped(&d, &dir, &dir_now);
}

#[test]
fn identical_content_under_a_new_inode_only_refreshes_the_stat_cache() {
    let mut d = Device::with_folder();
    let t = at(1_700_000_000, 0);
    d.write("a.txt", b"same");
    set_mtime(&d.path("a.txt"), t);
    scan(&mut d);
    let before = live(&d, "a.txt");

    // What `cp -p a.txt tmp && mv tmp a.txt` does.
    fs::write(d.path("a.tmp"), b"same").unwrap();
    set_mtime(&d.path("a.tmp"), t);
    fs::rename(d.path("a.tmp"), d.path("a.txt")).unwrap();
    let inode = fs::metadata(d.path("a.txt")).unwrap().ino();
    assert_ne!(inode, before.meta.inode);
    let report = scan(&mut d);

    assert_eq!((report.new, report.changed, report.hashed_files), (0, 0, 1));
    let after = live(&d, "a.txt");
    assert_eq!(after.meta.inode, inode);
    assert_eq!(after.version, before.version);
    assert_eq!(after.sequence, before.sequence);
    assert_eq!(after.hash, before.hash);
    assert_eq!(scan(&mut d).hashed_files, 0, "the new inode is remembered");
}

/// Appends to chosen files from inside the scanner's `hashed` callback, as a
/// writer racing the scan would.
struct Grower {
    targets: Vec<PathBuf>,
    every_call: bool,
    calls: Mutex<Vec<PathBuf>>,
}

impl Grower {
    fn new(targets: Vec<PathBuf>, every_call: bool) -> Self {
        Self {
            targets,
            every_call,
            calls: Mutex::new(Vec::new()),
        }
    }

    fn calls_for(&self, path: &Path) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

impl ScanProgress for Grower {
    fn hashed(&self, path: &Path, _bytes: u64) {
        let first = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(path.to_owned());
            calls.iter().filter(|p| *p == path).count() == 1
        };
        if self.targets.iter().any(|t| t == path) && (first || self.every_call) {
            append(path, b" and a bit more");
        }
    }
}

fn quick_retries() -> ScanOptions {
    ScanOptions {
        changing_retries: 2,
        ..Default::default()
    }
}

#[test]
fn a_file_that_grows_while_hashed_is_retried_and_recorded_with_its_final_content() {
    let mut d = Device::with_folder();
    let path = d.path("grow.bin");
    d.write("grow.bin", &pseudo_random(100_000, 5));
    d.write("calm.txt", b"calm");
    let grower = Grower::new(vec![path.clone()], false);

    let report = scan_with(&mut d, &quick_retries(), &grower).unwrap();

    assert!(report.changing.is_empty(), "{report:?}");
    assert_eq!((report.new, report.hashed_files), (2, 2));
    assert_eq!(grower.calls_for(&path), 2, "hashed once, then once more");
    let final_bytes = fs::read(&path).unwrap();
    assert_eq!(final_bytes.len(), 100_000 + b" and a bit more".len());
    assert_content(&d, "grow.bin", &final_bytes);
    assert_content(&d, "calm.txt", b"calm");
}

#[test]
fn a_file_that_keeps_changing_is_reported_and_left_as_last_recorded() {
    let mut d = Device::with_folder();
    let known = d.path("known.bin");
    let fresh = d.path("fresh.bin");
    d.write("known.bin", &pseudo_random(100_000, 6));
    scan(&mut d);
    let before = live(&d, "known.bin");
    let sequence = d.folder_now().sequence;
    append(&known, b"edited before the scan");
    d.write("fresh.bin", b"new and busy");
    let grower = Grower::new(vec![known.clone(), fresh.clone()], true);

    let report = scan_with(&mut d, &quick_retries(), &grower).unwrap();

    let mut changing = report.changing.clone();
    changing.sort();
    assert_eq!(changing, ["fresh.bin", "known.bin"]);
    assert_eq!((report.new, report.changed, report.deleted), (0, 0, 0));
    assert_eq!(report.hashed_files, 0);
    assert_eq!(grower.calls_for(&known), 3, "one try and two retries");
    assert_eq!(d.record("known.bin"), Some(before));
    assert_eq!(d.record("fresh.bin"), None);
    assert_eq!(d.folder_now().sequence, sequence);

    // Once the writer stops, the next scan records what is there.
    scan(&mut d);
    assert_content(&d, "known.bin", &fs::read(&known).unwrap());
    assert_content(&d, "fresh.bin", &fs::read(&fresh).unwrap());
}

#[test]
fn a_missing_root_fails_the_scan_records_the_error_and_tombstones_nothing() {
    let mut d = Device::with_folder();
    d.write("a.txt", b"a");
    d.write("dir/b.txt", b"b");
    scan(&mut d);
    let before = d.records();
    let sequence = d.folder_now().sequence;
    let root = d.root().to_owned();
    let away = d.tmp.path().join("unplugged");

    fs::rename(&root, &away).unwrap();
    let err = scan_with(&mut d, &ScanOptions::default(), &NoProgress).unwrap_err();
    assert!(
        matches!(&err, ScanError::Folder(FolderError::RootMissing(p)) if *p == root),
        "{err}"
    );
    assert_eq!(d.folder_now().error, Some(err.to_string()));
    assert_eq!(d.records(), before);

    // An empty mount point in its place is not the folder either.
    fs::create_dir(&root).unwrap();
    let err = scan_with(&mut d, &ScanOptions::default(), &NoProgress).unwrap_err();
    assert!(
        matches!(&err, ScanError::Folder(FolderError::MarkerMissing(p)) if *p == root),
        "{err}"
    );
    assert_eq!(d.folder_now().error, Some(err.to_string()));
    assert_eq!(d.records(), before);
    assert_eq!(d.folder_now().sequence, sequence);

    // Plugged back in: the scan succeeds, clears the error, and finds no change.
    fs::remove_dir(&root).unwrap();
    fs::rename(&away, &root).unwrap();
    let report = scan(&mut d);
    assert_eq!((report.new, report.changed, report.deleted), (0, 0, 0));
    assert_eq!(d.folder_now().error, None);
    assert_eq!(d.records(), before);
}

#[test]
fn a_missing_marker_fails_the_scan_records_the_error_and_tombstones_nothing() {
    let mut d = Device::with_folder();
    d.write("a.txt", b"a");
    d.write("dir/b.txt", b"b");
    scan(&mut d);
    let before = d.records();

    fs::remove_dir_all(d.path(".ferry")).unwrap();
    let err = scan_with(&mut d, &ScanOptions::default(), &NoProgress).unwrap_err();

    assert!(
        matches!(&err, ScanError::Folder(FolderError::MarkerMissing(_))),
        "{err}"
    );
    let error = d.folder_now().error.expect("the error is recorded");
    assert!(error.contains(".ferry"), "{error}");
    assert_eq!(d.records(), before);
}

/// Whether this process can still list a directory it just made unreadable
/// (true as root, which ignores permission bits).
fn can_list_anyway(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok()
}

#[test]
fn children_of_an_unreadable_directory_are_not_tombstoned() {
    let mut d = Device::with_folder();
    d.write("locked/a.txt", b"a");
    d.write("locked/sub/b.txt", b"b");
    d.write("open.txt", b"open");
    scan(&mut d);
    let before = d.records();

    let locked = d.path("locked");
    chmod(&locked, 0o000);
    if can_list_anyway(&locked) {
        chmod(&locked, 0o755);
        eprintln!("skipped: running with permission to read a mode-000 directory (root?)");
        return;
    }
    let report = scan_with(&mut d, &ScanOptions::default(), &NoProgress);
    chmod(&locked, 0o755);
    let report = report.unwrap();

    assert_eq!(report.deleted, 0, "{report:?}");
    assert!(
        report.issues.iter().any(|i| i.path == "locked"),
        "{:?}",
        report.issues
    );
    for old in before.iter().filter(|r| r.path.as_str() != "locked") {
        assert_eq!(d.record(old.path.as_str()).as_ref(), Some(old));
    }
}

/// Only meaningful when not run as root (root can list a mode-300 directory).
#[test]
fn an_unlistable_root_tombstones_nothing() {
    let mut d = Device::with_folder();
    d.write("a.txt", b"a");
    d.write("dir/b.txt", b"b");
    scan(&mut d);
    let before = d.records();

    // Searchable (so the marker check passes) but not listable.
    let root = d.root().to_owned();
    chmod(&root, 0o300);
    if can_list_anyway(&root) {
        chmod(&root, 0o755);
        eprintln!("skipped: running with permission to read a mode-300 directory (root?)");
        return;
    }
    let report = scan_with(&mut d, &ScanOptions::default(), &NoProgress);
    chmod(&root, 0o755);

    if let Ok(report) = report {
        assert_eq!(report.deleted, 0, "{report:?}");
        assert!(!report.issues.is_empty());
    }
    assert_eq!(d.records(), before);
}

#[test]
fn a_large_file_gets_the_same_chunks_as_chunking_in_memory() {
    let mut d = Device::with_folder();
    let bytes = pseudo_random(6 * 1024 * 1024 + 12_345, 7);
    d.write("large.bin", &bytes);

    let report = scan(&mut d);

    assert_eq!(report.hashed_bytes, bytes.len() as u64);
    let expected = chunk_bytes(&bytes, DEFAULT_PARAMS);
    let r = live(&d, "large.bin");
    assert_eq!(r.hash, Some(expected.hash));
    assert_eq!(r.meta.size, expected.size);
    assert_eq!(
        d.index
            .file_chunks(d.folder.row, &rel("large.bin"))
            .unwrap(),
        expected.chunks
    );
    assert_content(&d, "large.bin", &bytes);
}

#[test]
fn a_mass_delete_is_held_back_until_confirmed() {
    let mut d = Device::with_folder();
    for i in 0..20 {
        d.write(&format!("f{i:02}"), b"x");
    }
    scan(&mut d);
    let before = d.records();

    // A few deletes go through at once.
    for i in 0..3 {
        std::fs::remove_file(d.root().join(format!("f{i:02}"))).unwrap();
    }
    let r = scan(&mut d);
    assert_eq!((r.deleted, r.held_deletes), (3, 0));

    // Most of the folder gone at once: held back, nothing recorded.
    for i in 3..15 {
        std::fs::remove_file(d.root().join(format!("f{i:02}"))).unwrap();
    }
    let r = scan(&mut d);
    assert_eq!((r.deleted, r.held_deletes), (0, 12));
    let live = d.records().iter().filter(|r| !r.deleted).count();
    assert_eq!(live, before.len() - 3);
    assert_eq!(d.folder_now().held_deletes, 12);

    // Confirmed: recorded.
    let opts = ScanOptions {
        confirm_deletes: true,
        ..ScanOptions::default()
    };
    let r = scan_with(&mut d, &opts, &NoProgress).unwrap();
    assert_eq!((r.deleted, r.held_deletes), (12, 0));
    assert_eq!(d.folder_now().held_deletes, 0);
}
