//! Rebuilding a folder from a backup holder with its recovery code: finding the
//! vault the code opens, checking every record and chunk the holder serves, and
//! writing the files (each through a temp file, hash-verified, fsynced, renamed
//! into place).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use iroh::endpoint::Connection;

use super::holder;
use super::link::FetchError;
use crate::device::DeviceId;
use crate::disk::{sync_dir, system_time};
use crate::folder::FolderId;
use crate::progress::Progress;
use crate::relpath::TEMP_PREFIX;
use crate::vault::{
    ChunkId, FolderSecret, HolderError, RecordId, RecordKind, VaultError, VaultRecord, open_chunk,
    open_record,
};

/// Why a recovery failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The link or the holder failed.
    #[error("holder {holder}: {error}")]
    Holder {
        /// The holder.
        holder: DeviceId,
        /// What failed.
        error: FetchError,
    },
    /// No vault on the holder opens with this key.
    #[error(
        "no folder on holder {0} opens with this recovery code (a code for another folder, or a holder without this folder)"
    )]
    NoVault(DeviceId),
    /// The holder served something that does not open or check.
    #[error("{0}")]
    Refused(#[from] HolderError),
    /// This device already has the folder (or holds it).
    #[error(
        "this device already has folder {0}; to go back in time there, use `ferry restore --at`"
    )]
    Taken(FolderId),
    /// The destination is not usable.
    #[error("{path}: {reason}")]
    Destination {
        /// The path.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// Writing the files failed.
    #[error("writing {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
}

/// What a recovery rebuilt.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The folder id.
    pub folder: FolderId,
    /// Its label on the device that shared it.
    pub label: String,
    /// Files written.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The highest record revision seen (new records must go above it).
    pub revision: u64,
}

/// Rebuilds into `into` (missing or empty) the folder of `holder` that
/// `secret` opens, as it is now or, with `at` (Unix seconds), as it was then.
pub async fn recover(
    conn: &Connection,
    holder: DeviceId,
    secret: &FolderSecret,
    into: &Path,
    at: Option<i64>,
    taken: &std::collections::HashSet<String>,
    progress: &Progress,
) -> Result<Recovered, RecoverError> {
    let link = |error| RecoverError::Holder { holder, error };
    let keys = secret.keys();
    let mut found = None;
    for (id, label) in holder::list(conn).await.map_err(link)? {
        let Ok(folder) = FolderId::new(&id) else {
            continue;
        };
        // A vault sealed with another key is left after its first record.
        let ours = |rid: &[u8; 32], bytes: &[u8]| {
            !matches!(
                open_record(&keys, &folder, &RecordId(*rid), 0, bytes),
                Err(VaultError::WrongKey { .. })
            )
        };
        let Some(sealed) = holder::records(conn, &id, ours).await.map_err(link)? else {
            continue;
        };
        let mut opened = Vec::with_capacity(sealed.len());
        for (rid, bytes) in &sealed {
            let r = open_record(&keys, &folder, &RecordId(*rid), 0, bytes)
                .map_err(|e| e.from_holder(holder))?;
            opened.push(r);
        }
        if !opened.is_empty() {
            found = Some((folder, label, opened));
            break;
        }
    }
    let Some((folder, label, records)) = found else {
        return Err(RecoverError::NoVault(holder));
    };
    if taken.contains(folder.as_str()) {
        return Err(RecoverError::Taken(folder));
    }
    prepare(into)?;
    let revision = records.iter().map(|r| r.revision).max().unwrap_or(0);
    let mut live = state_at(&records, at);
    // Parents before children; directories get their permissions last, so a
    // read-only one does not stop its contents being written.
    live.sort_by(|a, b| a.path.as_str().cmp(b.path.as_str()));
    progress.set_total(
        live.iter()
            .filter(|r| r.kind == RecordKind::File)
            .map(|r| r.size)
            .sum(),
    );
    let mut out = Recovered {
        folder: folder.clone(),
        label,
        files: 0,
        bytes: 0,
        revision,
    };
    let mut cache: HashMap<ChunkId, Vec<u8>> = HashMap::new();
    let src = Source {
        conn,
        holder,
        keys: &keys,
        folder: &folder,
        progress,
    };
    for r in &live {
        let target = r.path.to_fs(into);
        let io = |error| RecoverError::Io {
            path: target.clone(),
            error,
        };
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io)?;
        }
        match r.kind {
            RecordKind::Dir => fs::create_dir_all(&target).map_err(io)?,
            RecordKind::Symlink => {
                let to = r.symlink_target.as_deref().unwrap_or("");
                std::os::unix::fs::symlink(to, &target).map_err(io)?;
            }
            RecordKind::File => {
                write_file(&src, r, &target, &mut cache).await?;
                out.files += 1;
                out.bytes += r.size;
            }
        }
    }
    for r in live.iter().rev().filter(|r| r.kind == RecordKind::Dir) {
        let target = r.path.to_fs(into);
        let perms = fs::Permissions::from_mode(r.permissions);
        fs::set_permissions(&target, perms).map_err(|error| RecoverError::Io {
            path: target.clone(),
            error,
        })?;
    }
    Ok(out)
}

/// The records to rebuild: the current ones, or with `at` (Unix seconds) per
/// path the version current then. That is the first version kept that left
/// the path after `at`, if its content was written by then (its mtime); with
/// none, the current record if it was modified by then (directories always);
/// else nothing (the path did not exist then, or its version was not kept).
fn state_at(records: &[VaultRecord], at: Option<i64>) -> Vec<&VaultRecord> {
    let current = records
        .iter()
        .filter(|r| r.superseded_at_ns.is_none() && !r.deleted);
    let Some(at) = at else {
        return current.collect();
    };
    let at_ns = at.saturating_mul(1_000_000_000).saturating_add(999_999_999);
    let mut first_after: HashMap<&str, &VaultRecord> = HashMap::new();
    for r in records.iter().filter(|r| r.kind != RecordKind::Dir) {
        let Some(left) = r.superseded_at_ns else {
            continue;
        };
        if left <= at_ns {
            continue;
        }
        let slot = first_after.entry(r.path.as_str()).or_insert(r);
        let key = |v: &VaultRecord| (v.superseded_at_ns, v.revision);
        if key(r) < key(slot) {
            *slot = r;
        }
    }
    let mut out: Vec<&VaultRecord> = first_after
        .values()
        .filter(|v| v.mtime_ns <= at_ns)
        .copied()
        .collect();
    out.extend(current.filter(|r| {
        !first_after.contains_key(r.path.as_str())
            && (r.kind == RecordKind::Dir || r.mtime_ns <= at_ns)
    }));
    out
}

/// Makes sure `into` is a directory with nothing in it.
fn prepare(into: &Path) -> Result<(), RecoverError> {
    let bad = |reason: &str| RecoverError::Destination {
        path: into.to_path_buf(),
        reason: reason.to_owned(),
    };
    match fs::read_dir(into) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(bad("is not empty; recover into a new or empty directory"));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(into).map_err(|e| bad(&e.to_string()))
        }
        Err(e) => Err(bad(&e.to_string())),
    }
}

/// Where sealed chunks come from, and how to open them.
struct Source<'a> {
    conn: &'a Connection,
    holder: DeviceId,
    keys: &'a crate::vault::VaultKeys,
    folder: &'a FolderId,
    progress: &'a Progress,
}

/// Fetches, opens and writes one file: temp file, whole-file hash, metadata,
/// fsync, rename.
async fn write_file(
    src: &Source<'_>,
    r: &VaultRecord,
    target: &Path,
    cache: &mut HashMap<ChunkId, Vec<u8>>,
) -> Result<(), RecoverError> {
    let dir = target.parent().unwrap_or(target);
    let tmp = dir.join(format!(
        "{TEMP_PREFIX}recover-{}",
        blake3::hash(r.path.as_str().as_bytes()).to_hex()
    ));
    let result = fill(src, r, target, &tmp, cache).await;
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// [`write_file`]'s work, leaving the temp file for it to remove on failure.
async fn fill(
    src: &Source<'_>,
    r: &VaultRecord,
    target: &Path,
    tmp: &Path,
    cache: &mut HashMap<ChunkId, Vec<u8>>,
) -> Result<(), RecoverError> {
    let io = |error| RecoverError::Io {
        path: target.to_path_buf(),
        error,
    };
    let dir = target.parent().unwrap_or(target);
    let (keys, folder, holder) = (src.keys, src.folder, src.holder);
    let mut file = fs::File::create(tmp).map_err(io)?;
    let mut hasher = blake3::Hasher::new();
    let mut written = 0u64;
    for (hash, len) in &r.chunks {
        let id = keys.chunk_id(hash);
        let plain = match cache.get(&id) {
            Some(p) => p.clone(),
            None => {
                let sealed = holder::get(src.conn, folder.as_str(), id.0, false)
                    .await
                    .map_err(|error| RecoverError::Holder { holder, error })?;
                let plain =
                    open_chunk(keys, folder, &id, &sealed).map_err(|e| e.from_holder(holder))?;
                // Chunks that repeat are usually near each other (zeros, padding).
                if cache.len() > 64 {
                    cache.clear();
                }
                cache.insert(id, plain.clone());
                plain
            }
        };
        if plain.len() != *len as usize {
            return Err(VaultError::Malformed {
                item: crate::vault::Item::Record,
                reason: format!("{} lists a chunk of the wrong length", r.path),
            }
            .from_holder(holder)
            .into());
        }
        hasher.update(&plain);
        file.write_all(&plain).map_err(io)?;
        written += plain.len() as u64;
        src.progress.add(plain.len() as u64);
    }
    let hash_ok = r.hash.is_none_or(|h| h.0 == *hasher.finalize().as_bytes());
    if written != r.size || !hash_ok {
        return Err(VaultError::Malformed {
            item: crate::vault::Item::Record,
            reason: format!("{} does not add up to its size and hash", r.path),
        }
        .from_holder(holder)
        .into());
    }
    file.set_permissions(fs::Permissions::from_mode(r.permissions))
        .map_err(io)?;
    file.set_modified(system_time(r.mtime_ns)).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(tmp, target).map_err(io)?;
    sync_dir(dir).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relpath::RelPath;

    const S: i64 = 1_000_000_000;

    fn rec(path: &str, mtime: i64, left: Option<i64>, revision: u64) -> VaultRecord {
        VaultRecord {
            path: RelPath::new(path).unwrap(),
            kind: RecordKind::File,
            size: 0,
            mtime_ns: mtime * S,
            permissions: 0o644,
            hash: None,
            symlink_target: None,
            deleted: false,
            version: Default::default(),
            modified_by: crate::device::ShortId(1),
            chunks: vec![],
            revision,
            superseded_at_ns: left.map(|t| t * S),
        }
    }

    fn picked(records: &[VaultRecord], at: Option<i64>) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = state_at(records, at)
            .into_iter()
            .map(|r| (r.path.as_str().to_owned(), r.revision))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_state_at_a_time_is_the_version_current_then() {
        let mut gone = rec("gone.txt", 10, None, 6);
        gone.deleted = true;
        let records = vec![
            // a.txt: written at 10, replaced at 20 by one written at 19,
            // replaced at 30 by the current one, written at 29.
            rec("a.txt", 10, Some(20), 1),
            rec("a.txt", 19, Some(30), 2),
            rec("a.txt", 29, None, 3),
            // gone.txt: written at 10, deleted at 25.
            rec("gone.txt", 10, Some(25), 4),
            gone,
            // new.txt: made at 40.
            rec("new.txt", 40, None, 5),
        ];
        assert_eq!(
            picked(&records, None),
            vec![("a.txt".into(), 3), ("new.txt".into(), 5)]
        );
        assert_eq!(
            picked(&records, Some(15)),
            vec![("a.txt".into(), 1), ("gone.txt".into(), 4)]
        );
        assert_eq!(
            picked(&records, Some(22)),
            vec![("a.txt".into(), 2), ("gone.txt".into(), 4)]
        );
        assert_eq!(picked(&records, Some(35)), vec![("a.txt".into(), 3)]);
        // Before anything was written: nothing.
        assert!(picked(&records, Some(5)).is_empty());
    }
}
