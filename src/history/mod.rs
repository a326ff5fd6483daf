//! Earlier versions of files, each device's own backups: the chunk store that
//! holds their bytes, moving the versions a pull set aside into it
//! ([`ingest`]), keeping local versions ([`local`]), the retention policy and
//! pruning, restoring versions and resolving conflicts, and checking it all.
//!
//! Where a version's bytes are: a pull commits the version's history row
//! (reserved: not listed yet), then renames the file it replaces to
//! `<folder>/.ferry/versions/<history id>` inside the transaction that records
//! the pull and makes the row a version (so pulls stay fast, and a kill at any
//! point leaves either the version at its path or its file under a row); the
//! agent then cuts that file by the version's chunk list into the chunk store
//! under `<home>/store` and deletes it.

pub mod ingest;
pub mod local;
pub mod prune;
pub mod resolve;
pub mod restore;
pub mod retention;
pub mod serve;
pub mod store;
pub mod time;
pub mod verify;

use std::path::{Path, PathBuf};

use crate::folder::marker_dir;
use crate::index::IndexError;
use store::StoreError;

/// The chunk store's directory in a device home.
pub fn store_dir(home: &Path) -> PathBuf {
    home.join("store")
}

/// Where a folder keeps the versions not in the chunk store yet.
pub fn versions_dir(root: &Path) -> PathBuf {
    marker_dir(root).join("versions")
}

/// The pending file of version `id`.
pub fn pending_file(root: &Path, id: i64) -> PathBuf {
    versions_dir(root).join(id.to_string())
}

/// The marker beside a pending file that could not be ingested (damaged or
/// changed), so it is kept as it is and not tried again.
pub fn damaged_marker(root: &Path, id: i64) -> PathBuf {
    versions_dir(root).join(format!("{id}.damaged"))
}

/// Why a history operation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// No version with that id.
    #[error("no version {0} in the history (see `ferry history PATH`)")]
    UnknownVersion(i64),
    /// The version is of another path.
    #[error("version {id} is of {actual}, not of {wanted} (see `ferry history {wanted}`)")]
    OtherPath {
        /// The version.
        id: i64,
        /// Its path.
        actual: String,
        /// The path asked for.
        wanted: String,
    },
    /// Nothing kept for the path.
    #[error("no earlier versions of {0} are kept")]
    NoHistory(String),
    /// Nothing kept was current at the time asked for.
    #[error(
        "no version of {path} was current at {at} UTC: it did not exist then, or the version it held was not kept"
    )]
    NoVersionAt {
        /// The path or directory.
        path: String,
        /// The time, formatted.
        at: String,
    },
    /// The destination exists.
    #[error("{0} already exists; pass --force to replace it")]
    DestExists(PathBuf),
    /// A version's bytes cannot be read back intact.
    #[error(
        "version {id} of {path} cannot be read back intact: {detail} (run `ferry history verify`)"
    )]
    Damaged {
        /// The version.
        id: i64,
        /// Its path.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A file changed on disk since the index last saw it.
    #[error("{0} changed on disk since the last scan; try again in a moment")]
    LocalChanged(String),
    /// The request makes no sense for what is there.
    #[error("{0}")]
    Refused(String),
    /// The chunk store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The folder root or marker is missing.
    #[error(transparent)]
    Folder(#[from] crate::folder::FolderError),
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Where.
        path: PathBuf,
        /// What happened.
        source: std::io::Error,
    },
}

/// Result alias for history operations.
pub type Result<T, E = HistoryError> = std::result::Result<T, E>;

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> HistoryError + '_ {
    move |source| HistoryError::Io {
        path: path.to_owned(),
        source,
    }
}

/// 16 random hex characters, for temp names.
fn random_suffix() -> String {
    let mut b = [0u8; 8];
    // Without randomness, fall back to the time and pid: names need only
    // differ from each other.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        b = (t ^ u64::from(std::process::id()) << 32).to_be_bytes();
    }
    data_encoding::HEXLOWER.encode(&b)
}

/// Fsyncs a directory, so renames and deletes in it are durable.
fn sync_dir(dir: &Path) -> Result<()> {
    crate::disk::sync_dir(dir).map_err(io_at(dir))
}
