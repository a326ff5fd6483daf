//! `RelPath`: a path inside a synced folder, validated so that it can never name
//! anything outside the folder or inside ferry's own marker directory.

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// The directory at a folder root that marks it as a ferry folder and holds
/// ferry's temp files. Never indexed, never synced.
pub const MARKER_DIR: &str = ".ferry";

/// How the names of ferry's temp files begin. A file being pulled is
/// assembled beside its final place (as rsync and Syncthing do: no single
/// directory takes every create, and the rename stays in one directory), under
/// a name no synced path may have.
pub const TEMP_PREFIX: &str = ".ferry-tmp-";

/// Longest path accepted, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single name accepted, in bytes (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// A relative, `/`-separated, UTF-8 path inside a folder.
///
/// Invariants, checked by [`RelPath::new`]: not empty; no leading or trailing
/// `/`; no empty, `.` or `..` component; no NUL; not inside [`MARKER_DIR`]; at
/// most [`MAX_PATH_LEN`] bytes with no name over [`MAX_NAME_LEN`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(String);

/// Why a string is not a valid [`RelPath`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelPathError {
    /// The empty string names the folder root itself.
    #[error("empty path")]
    Empty,
    /// Starts with `/`.
    #[error("absolute path {0:?}")]
    Absolute(String),
    /// Has a `..` component.
    #[error("path {0:?} climbs out with '..'")]
    ParentDir(String),
    /// Has an empty or `.` component (`a//b`, `a/./b`, trailing `/`).
    #[error("path {0:?} is not in normal form")]
    NotNormal(String),
    /// Contains a NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    /// Over [`MAX_PATH_LEN`] or with a name over [`MAX_NAME_LEN`].
    #[error("path of {0} bytes is too long")]
    TooLong(usize),
    /// Inside ferry's marker directory, or named like ferry's temp files.
    #[error(
        "path {0:?} is reserved for ferry (its {MARKER_DIR}/ directory or a {TEMP_PREFIX}* temp file)"
    )]
    Reserved(String),
    /// A file name that is not UTF-8.
    #[error("name {0:?} is not valid UTF-8")]
    NotUtf8(String),
}

impl RelPath {
    /// Validates `s` as a path inside a folder.
    pub fn new(s: &str) -> Result<Self, RelPathError> {
        if s.is_empty() {
            return Err(RelPathError::Empty);
        }
        if s.len() > MAX_PATH_LEN {
            return Err(RelPathError::TooLong(s.len()));
        }
        if s.contains('\0') {
            return Err(RelPathError::Nul(s.to_owned()));
        }
        if s.starts_with('/') {
            return Err(RelPathError::Absolute(s.to_owned()));
        }
        for (i, name) in s.split('/').enumerate() {
            match name {
                ".." => return Err(RelPathError::ParentDir(s.to_owned())),
                "" | "." => return Err(RelPathError::NotNormal(s.to_owned())),
                MARKER_DIR if i == 0 => return Err(RelPathError::Reserved(s.to_owned())),
                n if n.starts_with(TEMP_PREFIX) => {
                    return Err(RelPathError::Reserved(s.to_owned()));
                }
                n if n.len() > MAX_NAME_LEN => return Err(RelPathError::TooLong(n.len())),
                _ => {}
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// `parent/name`, validated.
    pub fn join(parent: Option<&RelPath>, name: &std::ffi::OsStr) -> Result<Self, RelPathError> {
        let name = name
            .to_str()
            .ok_or_else(|| RelPathError::NotUtf8(name.to_string_lossy().into_owned()))?;
        match parent {
            Some(p) => Self::new(&format!("{}/{name}", p.0)),
            None => Self::new(name),
        }
    }

    /// The path as stored and sent: `/`-separated.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where this path is under `root` on this machine.
    pub fn to_fs(&self, root: &Path) -> PathBuf {
        root.join(&self.0)
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// Builds a `RelPath` from a path relative to a folder root on this machine.
    pub fn from_fs(rel: &Path) -> Result<Self, RelPathError> {
        let mut parts = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => parts.push(
                    n.to_str()
                        .ok_or_else(|| RelPathError::NotUtf8(n.to_string_lossy().into_owned()))?,
                ),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(RelPathError::ParentDir(rel.display().to_string()));
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(RelPathError::Absolute(rel.display().to_string()));
                }
            }
        }
        Self::new(&parts.join("/"))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "a/../../b",
            "a//b",
            "./a",
            "a/",
            "a/.",
            "a\0b",
            ".ferry",
            ".ferry/tmp/x",
            "a/.ferry-tmp-0123-4567.part",
        ] {
            assert!(RelPath::new(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(RelPath::new(&"a".repeat(256)).is_err());
        assert!(RelPath::new(&"a/".repeat(2100)).is_err());
        for good in ["a", "a/b.txt", "dir/.ferry", "..hidden", "a b/c…"] {
            assert_eq!(RelPath::new(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn starts_with_is_by_component() {
        let a = RelPath::new("a/b").unwrap();
        assert!(a.starts_with(&RelPath::new("a").unwrap()));
        assert!(a.starts_with(&a));
        assert!(
            !RelPath::new("ab")
                .unwrap()
                .starts_with(&RelPath::new("a").unwrap())
        );
    }

    proptest! {
        #[test]
        fn a_valid_path_stays_under_its_root(s in "[a-z./\\\\\0]{0,40}") {
            if let Ok(p) = RelPath::new(&s) {
                let root = Path::new("/srv/folder");
                let full = p.to_fs(root);
                prop_assert!(full.starts_with(root));
                prop_assert!(full.components().all(|c| matches!(c, Component::Normal(_) | Component::RootDir)));
                prop_assert!(!full.starts_with(root.join(MARKER_DIR)));
                prop_assert_eq!(RelPath::from_fs(Path::new(&s)).unwrap(), p);
            }
        }
    }
}
