//! Shared setup for integration tests: a real device home and folder in a temp
//! directory.

// Each test crate includes this module and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ferry::device::ShortId;
use ferry::folder::{self, FolderType, NewFolder};
use ferry::home::{Home, InitOutcome};
use ferry::index::{FileRecord, Folder, Index};
use ferry::relpath::RelPath;

/// A device home and one added folder, all under one temp directory.
pub struct Device {
    /// Keeps the temp directory alive; everything below lives in it.
    pub tmp: tempfile::TempDir,
    /// The initialised home.
    pub home: Home,
    /// The home's index, open.
    pub index: Index,
    /// The folder as added (its `path` is canonical).
    pub folder: Folder,
}

impl Device {
    /// Creates a home in a fresh temp directory and adds `<tmp>/folder` to it.
    pub fn with_folder() -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let InitOutcome::Created(home) =
            Home::init(&tmp.path().join("home"), Some("test")).expect("init home")
        else {
            panic!("a fresh temp dir already held a home");
        };
        let mut index = home.index().expect("open index");
        let root = tmp.path().join("folder");
        std::fs::create_dir(&root).expect("create folder root");
        let folder = folder::add(
            &mut index,
            NewFolder {
                path: root,
                id: None,
                label: None,
                folder_type: FolderType::SendReceive,
            },
        )
        .expect("add folder");
        Self {
            tmp,
            home,
            index,
            folder,
        }
    }

    /// This device's short id (the key of its version-vector entries).
    pub fn me(&self) -> ShortId {
        self.home.device_id().short()
    }

    /// The folder root.
    pub fn root(&self) -> &Path {
        &self.folder.path
    }

    /// `rel` under the folder root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.folder.path.join(rel)
    }

    /// Writes `bytes` to `rel` in the folder, creating parent directories.
    pub fn write(&self, rel: &str, bytes: &[u8]) {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("create parents");
        }
        std::fs::write(&p, bytes).expect("write file");
    }

    /// The folder row as the index holds it now.
    pub fn folder_now(&self) -> Folder {
        self.index
            .folder(&self.folder.id)
            .expect("read folder")
            .expect("folder exists")
    }

    /// Every record of the folder, tombstones included.
    pub fn records(&self) -> Vec<FileRecord> {
        self.index
            .list_files(self.folder.row, None, true)
            .expect("list files")
    }

    /// The record at `rel` (tombstone or not), if any.
    pub fn record(&self, rel: &str) -> Option<FileRecord> {
        let p = RelPath::new(rel).expect("valid path");
        self.index
            .list_files(self.folder.row, Some(&p), true)
            .expect("list files")
            .into_iter()
            .find(|r| r.path == p)
    }
}
