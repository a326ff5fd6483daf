//! Concurrent versions of a file: which one wins (the same on every device) and
//! what the losing one's copy is called.

use std::cmp::Ordering;

use crate::index::RemoteFile;
use crate::relpath::RelPath;

/// Whether `a` wins over the concurrent version `b`. A change beats a delete;
/// otherwise the newer mtime wins, and ties go to the larger device id, so
/// every device decides the same way.
pub fn wins(a: &RemoteFile, b: &RemoteFile) -> bool {
    match (a.deleted, b.deleted) {
        (false, true) => true,
        (true, false) => false,
        _ => match a.mtime_ns.cmp(&b.mtime_ns) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => a.modified_by.0 > b.modified_by.0,
        },
    }
}

/// `dir/name.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.ext` for the losing version
/// `loser` of `path`: its mtime (UTC) and the first 7 hex digits of the device
/// that made it, so every device names the same copy the same way.
pub fn conflict_path(path: &RelPath, loser: &RemoteFile) -> RelPath {
    let s = path.as_str();
    let (dir, name) = match s.rfind('/') {
        Some(i) => (&s[..=i], &s[i + 1..]),
        None => ("", s),
    };
    // The extension is what follows the last dot, unless the dot starts the
    // name (".bashrc") or there is none.
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let stamp = utc_stamp(loser.mtime_ns.div_euclid(1_000_000_000));
    let device = &format!("{}", loser.modified_by)[..7];
    let candidate = format!("{dir}{stem}.sync-conflict-{stamp}-{device}{ext}");
    RelPath::new(&candidate).unwrap_or_else(|_| path.clone())
}

/// `YYYYMMDD-HHMMSS` for Unix seconds, in UTC.
fn utc_stamp(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::ShortId;
    use crate::index::FileKind;
    use crate::version_vector::VersionVector;

    fn rec(mtime_s: i64, dev: u64, deleted: bool) -> RemoteFile {
        RemoteFile {
            path: RelPath::new("docs/report.final.txt").unwrap(),
            kind: FileKind::File,
            size: 1,
            mtime_ns: mtime_s * 1_000_000_000,
            permissions: 0o644,
            hash: None,
            symlink_target: None,
            deleted,
            version: VersionVector::new().bumped(ShortId(dev)),
            modified_by: ShortId(dev),
            sequence: 1,
            groups: vec![],
        }
    }

    #[test]
    fn the_rule_is_the_same_from_both_sides() {
        let cases = [
            (rec(10, 1, false), rec(20, 2, false)),
            (rec(10, 1, false), rec(10, 2, false)),
            (rec(30, 1, true), rec(10, 2, false)),
        ];
        for (a, b) in cases {
            assert_ne!(wins(&a, &b), wins(&b, &a));
        }
        assert!(wins(&rec(20, 1, false), &rec(10, 2, false)));
        assert!(wins(&rec(10, 2, false), &rec(10, 1, false)));
        assert!(
            wins(&rec(1, 1, false), &rec(99, 2, true)),
            "a change beats a delete"
        );
    }

    #[test]
    fn conflict_copies_are_named_like_syncthings() {
        let loser = rec(1_700_000_000, 0xabcdef0123456789, false);
        let p = RelPath::new("docs/report.final.txt").unwrap();
        assert_eq!(
            conflict_path(&p, &loser).as_str(),
            "docs/report.final.sync-conflict-20231114-221320-abcdef0.txt"
        );
        let p = RelPath::new(".bashrc").unwrap();
        assert_eq!(
            conflict_path(&p, &loser).as_str(),
            ".bashrc.sync-conflict-20231114-221320-abcdef0"
        );
    }
}
