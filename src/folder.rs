//! Folders on disk: their ids and types, adding one (checks and the `.ferry/`
//! marker), and telling a healthy root from a missing one.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::index::{Folder, Index, IndexError};
use crate::relpath::MARKER_DIR;

/// Longest folder id accepted.
pub const MAX_FOLDER_ID_LEN: usize = 64;

/// A folder's id, shared by every device that syncs it: 1 to 64 of
/// `A-Z a-z 0-9 . _ -`, not starting with `.`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct FolderId(String);

impl FolderId {
    /// Validates a folder id.
    pub fn new(s: &str) -> Result<Self, FolderError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_FOLDER_ID_LEN
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(FolderError::BadId(s.to_owned()))
        }
    }

    /// A fresh random id like `k3x9a-q7mzp` (about 51 bits).
    pub fn random() -> Self {
        const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyz23456789";
        let bytes: [u8; 10] = rand_bytes();
        let mut s = String::with_capacity(11);
        for (i, b) in bytes.iter().enumerate() {
            if i == 5 {
                s.push('-');
            }
            s.push(ALPHABET[*b as usize % ALPHABET.len()] as char);
        }
        Self(s)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // The OS random source failing is not something a folder id can work around.
    getrandom::fill(&mut out).expect("the OS random number generator failed");
    out
}

impl fmt::Display for FolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which way changes flow for a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FolderType {
    /// Local changes are sent and remote changes applied.
    #[default]
    SendReceive,
    /// Local changes are sent; remote changes are never applied.
    SendOnly,
    /// Remote changes are applied; local changes are not sent.
    ReceiveOnly,
}

impl FolderType {
    /// The name used in the CLI, config and database.
    pub fn as_str(self) -> &'static str {
        match self {
            FolderType::SendReceive => "send-receive",
            FolderType::SendOnly => "send-only",
            FolderType::ReceiveOnly => "receive-only",
        }
    }
}

impl FromStr for FolderType {
    type Err = FolderError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "send-receive" => Ok(FolderType::SendReceive),
            "send-only" => Ok(FolderType::SendOnly),
            "receive-only" => Ok(FolderType::ReceiveOnly),
            _ => Err(FolderError::BadType(s.to_owned())),
        }
    }
}

impl fmt::Display for FolderType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a folder cannot be added or used.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// Not a usable id.
    #[error(
        "invalid folder id {0:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    BadId(String),
    /// Not a folder type.
    #[error("invalid folder type {0:?}: use send-receive, send-only or receive-only")]
    BadType(String),
    /// The path does not exist.
    #[error("{0} does not exist")]
    NotFound(PathBuf),
    /// The path is a file or something else.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// Nested inside another folder.
    #[error("{path} is inside folder {other} ({other_path}); folders cannot nest")]
    Inside {
        /// The new path.
        path: PathBuf,
        /// The folder containing it.
        other: FolderId,
        /// That folder's root.
        other_path: PathBuf,
    },
    /// Contains another folder.
    #[error("{path} contains folder {other} ({other_path}); folders cannot nest")]
    Contains {
        /// The new path.
        path: PathBuf,
        /// The folder inside it.
        other: FolderId,
        /// That folder's root.
        other_path: PathBuf,
    },
    /// No folder has that id.
    #[error("no folder with id {0} (see `ferry folder list`)")]
    Unknown(String),
    /// The root is gone (an unmounted disk?).
    #[error("folder root {0} is missing (unmounted disk?); its files are not treated as deleted")]
    RootMissing(PathBuf),
    /// The root exists but its marker does not.
    #[error(
        "folder root {0} has no {MARKER_DIR}/ marker (a different disk mounted there?); its files are not treated as deleted. If this is the right directory, run `ferry folder add` again after `ferry folder remove`"
    )]
    MarkerMissing(PathBuf),
    /// A filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// What.
        source: std::io::Error,
    },
    /// The index refused.
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// What `ferry folder add` asks for.
#[derive(Debug, Clone)]
pub struct NewFolder {
    /// The root directory.
    pub path: PathBuf,
    /// The id (random when `None`).
    pub id: Option<FolderId>,
    /// A human name (the directory name when `None`).
    pub label: Option<String>,
    /// The direction of sync.
    pub folder_type: FolderType,
}

/// The marker directory of a folder root.
pub fn marker_dir(root: &Path) -> PathBuf {
    root.join(MARKER_DIR)
}

/// Where ferry keeps its temp files in a folder (same filesystem as the files,
/// so a rename into place is atomic).
pub fn temp_dir(root: &Path) -> PathBuf {
    marker_dir(root).join("tmp")
}

/// Adds a folder: checks the path, refuses nesting and duplicates, creates the
/// marker, and records it, all or nothing.
pub fn add(index: &mut Index, new: NewFolder) -> Result<Folder, FolderError> {
    let path = match std::fs::metadata(&new.path) {
        Ok(m) if m.is_dir() => {
            std::fs::canonicalize(&new.path).map_err(|source| FolderError::Io {
                path: new.path.clone(),
                source,
            })?
        }
        Ok(_) => return Err(FolderError::NotADirectory(new.path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FolderError::NotFound(new.path));
        }
        Err(source) => {
            return Err(FolderError::Io {
                path: new.path,
                source,
            });
        }
    };
    for other in index.folders()? {
        if path != other.path && path.starts_with(&other.path) {
            return Err(FolderError::Inside {
                path,
                other: other.id,
                other_path: other.path,
            });
        }
        if path != other.path && other.path.starts_with(&path) {
            return Err(FolderError::Contains {
                path,
                other: other.id,
                other_path: other.path,
            });
        }
    }
    let id = new.id.unwrap_or_else(FolderId::random);
    let label = new.label.unwrap_or_else(|| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| id.to_string())
    });
    let marker = marker_dir(&path);
    let existed = marker.exists();
    let result = index.add_folder(&id, &label, &path, new.folder_type, || {
        std::fs::create_dir_all(temp_dir(&path))
    });
    if result.is_err() && !existed {
        // Leave the directory exactly as it was.
        let _ = std::fs::remove_dir(temp_dir(&path));
        let _ = std::fs::remove_dir(&marker);
    }
    Ok(result?)
}

/// Checks that a folder's root and marker are there; a folder that fails this
/// must not be scanned, or its files would look deleted.
pub fn check_root(folder: &Folder) -> Result<(), FolderError> {
    match std::fs::metadata(&folder.path) {
        Ok(m) if m.is_dir() => {}
        _ => return Err(FolderError::RootMissing(folder.path.clone())),
    }
    match std::fs::symlink_metadata(marker_dir(&folder.path)) {
        Ok(m) if m.is_dir() => Ok(()),
        _ => Err(FolderError::MarkerMissing(folder.path.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_ids_are_checked() {
        assert!(FolderId::new("photos-2024_v1.0").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65), "ü"] {
            assert!(FolderId::new(bad).is_err(), "{bad:?}");
        }
        let r = FolderId::random();
        assert_eq!(FolderId::new(r.as_str()).unwrap(), r);
        assert_ne!(FolderId::random(), r);
    }
}
