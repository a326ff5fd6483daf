//! Conversions between index records (and folder offers) and their wire form,
//! with the checks a record from a peer must pass before anything stores it.

use crate::chunking::{ChunkGroup, ChunkInfo, FileHash, groups};
use crate::device::ShortId;
use crate::index::{FileKind, LocalFile, Offered, RemoteFile};
use crate::protocol::{FolderOffer, WireFile, WireGroup};
use crate::relpath::RelPath;
use crate::vault::FolderSecret;
use crate::version_vector::VersionVector;

/// Why a record from a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum BadRecord {
    /// The path is absolute, has `..`, a NUL, or is otherwise unusable.
    #[error("unsafe path {path:?}: {reason}")]
    Path {
        /// The path as sent.
        path: String,
        /// Why.
        reason: String,
    },
    /// Some other field is inconsistent.
    #[error("malformed record for {path:?}: {reason}")]
    Field {
        /// The path as sent.
        path: String,
        /// Why.
        reason: String,
    },
}

/// A local record in wire form; `chunks` are its chunks (files).
pub fn to_wire(f: &LocalFile, chunks: &[ChunkInfo]) -> WireFile {
    let r = &f.record;
    WireFile {
        path: r.path.as_str().to_owned(),
        kind: r.kind.to_wire(),
        size: if r.deleted { 0 } else { r.size },
        mtime_ns: r.mtime_ns,
        permissions: r.permissions,
        hash: r.hash.map(|h| h.0),
        symlink_target: r.symlink_target.clone(),
        deleted: r.deleted,
        version: r.version.iter().map(|(d, c)| (d.0, c)).collect(),
        modified_by: r.modified_by.0,
        sequence: r.sequence,
        groups: if r.kind == FileKind::File && !r.deleted {
            groups(chunks)
                .into_iter()
                .map(|g| WireGroup {
                    hash: g.hash,
                    chunks: g.chunks,
                    size: g.size,
                })
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// A peer's record, checked: the path must be a safe relative path, and the
/// fields must agree with the kind.
pub fn from_wire(w: WireFile) -> Result<RemoteFile, BadRecord> {
    let path = RelPath::new(&w.path).map_err(|e| BadRecord::Path {
        path: w.path.clone(),
        reason: e.to_string(),
    })?;
    let field = |reason: &str| BadRecord::Field {
        path: w.path.clone(),
        reason: reason.to_owned(),
    };
    let kind = FileKind::from_wire(w.kind).ok_or_else(|| field("unknown kind"))?;
    let mut version = VersionVector::new();
    for (d, c) in &w.version {
        if *c == 0 || version.get(ShortId(*d)) != 0 {
            return Err(field("bad version vector"));
        }
        version = version.with(ShortId(*d), *c);
    }
    if version.is_empty() {
        return Err(field("empty version vector"));
    }
    if !w.deleted {
        match kind {
            FileKind::File if w.hash.is_none() => return Err(field("a file without a hash")),
            FileKind::File => {
                let total: u64 = w.groups.iter().map(|g| g.size).sum();
                if total != w.size || (w.size > 0) == w.groups.is_empty() {
                    return Err(field("chunk groups do not add up to the size"));
                }
            }
            FileKind::Symlink => {
                let t = w.symlink_target.as_deref().unwrap_or("");
                if t.is_empty() || t.contains('\0') {
                    return Err(field("a symlink without a usable target"));
                }
            }
            FileKind::Dir => {}
        }
    }
    Ok(RemoteFile {
        path,
        kind,
        size: if w.deleted { 0 } else { w.size },
        mtime_ns: w.mtime_ns,
        permissions: w.permissions & 0o7777,
        hash: if kind == FileKind::File && !w.deleted {
            w.hash.map(FileHash)
        } else {
            None
        },
        symlink_target: if kind == FileKind::Symlink && !w.deleted {
            w.symlink_target
        } else {
            None
        },
        deleted: w.deleted,
        version,
        modified_by: ShortId(w.modified_by),
        sequence: w.sequence,
        groups: w
            .groups
            .into_iter()
            .map(|g| ChunkGroup {
                hash: g.hash,
                chunks: g.chunks,
                size: g.size,
            })
            .collect(),
    })
}

/// A folder offer as sent; an encrypted one never carries the secret.
pub fn offer_to_wire(o: Offered) -> FolderOffer {
    FolderOffer {
        secret: o.secret.filter(|_| !o.encrypted).map(|s| *s.as_bytes()),
        id: o.id,
        label: o.label,
        encrypted: o.encrypted,
    }
}

/// A folder offer as received; a secret with an encrypted offer is dropped.
pub fn offer_from_wire(o: FolderOffer) -> Offered {
    Offered {
        secret: o
            .secret
            .filter(|_| !o.encrypted)
            .map(FolderSecret::from_bytes),
        id: o.id,
        label: o.label,
        encrypted: o.encrypted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(path: &str) -> WireFile {
        WireFile {
            path: path.into(),
            kind: 0,
            size: 3,
            mtime_ns: 1,
            permissions: 0o100644,
            hash: Some([1; 32]),
            symlink_target: None,
            deleted: false,
            version: vec![(5, 1)],
            modified_by: 5,
            sequence: 1,
            groups: vec![WireGroup {
                hash: [2; 32],
                chunks: 1,
                size: 3,
            }],
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        for p in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "a\0b",
            "",
            ".ferry/tmp/x",
            "a//b",
        ] {
            let err = from_wire(wire(p)).unwrap_err();
            assert!(matches!(err, BadRecord::Path { .. }), "{p:?}: {err}");
        }
        assert!(from_wire(wire("docs/a.txt")).is_ok());
    }

    #[test]
    fn inconsistent_records_are_refused() {
        let mut w = wire("a");
        w.size = 4;
        assert!(from_wire(w).is_err());
        let mut w = wire("a");
        w.version = vec![];
        assert!(from_wire(w).is_err());
        let mut w = wire("a");
        w.version = vec![(5, 1), (5, 2)];
        assert!(from_wire(w).is_err());
        let mut w = wire("a");
        w.hash = None;
        assert!(from_wire(w).is_err());
        let mut w = wire("a");
        w.kind = 9;
        assert!(from_wire(w).is_err());
    }

    #[test]
    fn permissions_are_masked_to_mode_bits() {
        let r = from_wire(wire("a")).unwrap();
        assert_eq!(r.permissions, 0o644);
    }
}
