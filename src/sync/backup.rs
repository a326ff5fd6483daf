//! Sending folders, sealed, to the devices that hold them encrypted: for each
//! holder, every record changed since it was last sent (its chunks first, only
//! the ones it lacks), in the background as changes commit.
//!
//! Records are sealed with a revision that grows with every record sent to that
//! holder, so a reader can refuse an older one it is served in place of a newer
//! one it has seen (see `vault`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use iroh::endpoint::Connection;

use super::Engine;
use super::holder;
use super::link::{FetchError, read_verified};
use crate::chunking::{ChunkHash, ChunkInfo};
use crate::device::DeviceId;
use crate::folder::FolderId;
use crate::index::{Folder, HolderState, IndexError, LocalFile};
use crate::protocol::MAX_INLINE_RECORD;
use crate::vault::{VaultKeys, VaultRecord, seal_chunk, seal_record};

/// Why sending to a holder stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The local index failed.
    #[error("index: {0}")]
    Index(#[from] IndexError),
    /// The link or the holder failed.
    #[error("holder: {0}")]
    Holder(#[from] FetchError),
    /// Sealing failed (a record over the format's limits).
    #[error("sealing: {0}")]
    Seal(#[from] crate::vault::VaultError),
}

/// Records read per round.
const BATCH: usize = 512;
/// Sealed chunks in flight to a holder at once.
const IN_FLIGHT: usize = 8;

/// Keeps `peer` sent every folder it holds for this device while the link
/// lasts: after each local change, when the peer's list of held folders
/// changes, and every minute as a backstop.
pub async fn run(engine: Arc<Engine>, conn: Connection, peer: DeviceId) {
    let mut changes = engine.local_changes.subscribe();
    let mut vaults = engine.peer_vaults.subscribe();
    loop {
        let held: HashSet<String> = vaults
            .borrow_and_update()
            .get(&peer)
            .cloned()
            .unwrap_or_default();
        for id in held {
            let Some(h) = engine.folder(&id) else {
                continue;
            };
            let folder = h.folder();
            let fid = folder.id.clone();
            let holds = engine
                .index
                .run(move |i| i.is_vault_holder(&fid, &peer))
                .await
                .unwrap_or(false);
            if !holds {
                continue;
            }
            match push(&engine, &conn, peer, &folder).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(device = %peer, folder = %folder.id, records = n, "sent to the backup holder")
                }
                Err(e) => tracing::warn!(device = %peer, folder = %folder.id, "backup holder: {e}"),
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            r = vaults.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = conn.closed() => return,
        }
    }
}

/// Sends `peer` what it lacks of `folder`; returns how many records went.
pub async fn push(
    engine: &Arc<Engine>,
    conn: &Connection,
    peer: DeviceId,
    folder: &Folder,
) -> Result<usize, BackupError> {
    let row = folder.row;
    let (state, keys) = engine
        .index
        .run(move |i| -> Result<_, IndexError> {
            let state = i.holder_state(row, &peer)?.unwrap_or_default();
            Ok((state, i.folder_secret(row)?.keys()))
        })
        .await?;
    let keys = Arc::new(keys);
    let mut state = state;
    let mut sent = 0;
    loop {
        let after = state.pushed as u64;
        let batch = engine
            .index
            .run(
                move |i| -> Result<Vec<(LocalFile, Vec<ChunkInfo>)>, IndexError> {
                    let files = i.local_since(row, after, BATCH)?;
                    files
                        .into_iter()
                        .map(|f| {
                            let chunks = if f.record.deleted {
                                Vec::new()
                            } else {
                                i.file_chunks(row, &f.record.path)?
                            };
                            Ok((f, chunks))
                        })
                        .collect()
                },
            )
            .await?;
        let Some(last) = batch.iter().map(|(f, _)| f.record.sequence).max() else {
            return Ok(sent);
        };
        let unsent = send_chunks(conn, folder, &keys, &batch).await?;
        let mut inline = Vec::new();
        for (f, chunks) in &batch {
            if unsent.contains(f.record.path.as_str()) {
                // Its file changed under us: the scan brings a newer record.
                continue;
            }
            state.revision += 1;
            let rec = vault_record(f, chunks, state.revision);
            let sealed = seal_record(&keys, &folder.id, &rec)?;
            if sealed.bytes.len() <= MAX_INLINE_RECORD {
                inline.push((sealed.id.0, sealed.bytes));
            } else {
                holder::put(conn, folder.id.as_str(), sealed.id.0, &sealed.bytes, true).await?;
            }
            sent += 1;
        }
        holder::put_records(conn, folder.id.as_str(), inline).await?;
        state = HolderState {
            pushed: last as i64,
            revision: state.revision,
        };
        let s = state;
        engine
            .index
            .run(move |i| i.set_holder_state(row, &peer, s))
            .await?;
    }
}

/// The record a holder keeps for a local file.
fn vault_record(f: &LocalFile, chunks: &[ChunkInfo], revision: u64) -> VaultRecord {
    let r = &f.record;
    VaultRecord {
        path: r.path.clone(),
        kind: r.kind.into(),
        size: r.size,
        mtime_ns: r.mtime_ns,
        permissions: r.permissions,
        hash: r.hash,
        symlink_target: r.symlink_target.clone(),
        deleted: r.deleted,
        version: r.version.clone(),
        modified_by: r.modified_by,
        chunks: chunks.iter().map(|c| (c.hash, c.len)).collect(),
        revision,
        superseded_at_ns: None,
    }
}

/// Sends the holder the chunks of `batch` it lacks, sealed. Returns the paths
/// whose chunks could not be read as indexed (changed since).
async fn send_chunks(
    conn: &Connection,
    folder: &Folder,
    keys: &Arc<VaultKeys>,
    batch: &[(LocalFile, Vec<ChunkInfo>)],
) -> Result<HashSet<String>, BackupError> {
    // Each distinct chunk once, with where to read it.
    let mut wanted: HashMap<ChunkHash, (String, ChunkInfo)> = HashMap::new();
    for (f, chunks) in batch {
        for c in chunks {
            wanted
                .entry(c.hash)
                .or_insert_with(|| (f.record.path.as_str().to_owned(), *c));
        }
    }
    let list: Vec<(ChunkHash, (String, ChunkInfo))> = wanted.into_iter().collect();
    let ids: Vec<[u8; 32]> = list.iter().map(|(h, _)| keys.chunk_id(h).0).collect();
    let missing = holder::missing(conn, folder.id.as_str(), &ids).await?;
    let mut unreadable = HashSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in missing {
        if tasks.len() >= IN_FLIGHT
            && let Some(r) = tasks.join_next().await
        {
            settle(r, &mut unreadable)?;
        }
        let (hash, (path, c)) = list[i].clone();
        let (conn, keys, root, fid) = (
            conn.clone(),
            keys.clone(),
            folder.path.clone(),
            folder.id.clone(),
        );
        tasks.spawn(async move { send_one(&conn, &keys, &fid, &root, &path, c, hash).await });
    }
    while let Some(r) = tasks.join_next().await {
        settle(r, &mut unreadable)?;
    }
    Ok(unreadable)
}

type Sent = Result<Option<String>, BackupError>;

fn settle(
    r: Result<Sent, tokio::task::JoinError>,
    unreadable: &mut HashSet<String>,
) -> Result<(), BackupError> {
    match r {
        Ok(Ok(None)) => Ok(()),
        Ok(Ok(Some(path))) => {
            unreadable.insert(path);
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(e) => Err(BackupError::Holder(FetchError::Link(e.to_string()))),
    }
}

/// Reads, seals and sends one chunk; `Some(path)` if the file no longer has it.
async fn send_one(
    conn: &Connection,
    keys: &VaultKeys,
    folder: &FolderId,
    root: &std::path::Path,
    path: &str,
    c: ChunkInfo,
    hash: ChunkHash,
) -> Sent {
    let at = root.join(path);
    let (keys2, folder2) = (keys.clone(), folder.clone());
    let sealed = tokio::task::spawn_blocking(move || {
        read_verified(&at, c.offset, c.len, &hash)
            .map(|bytes| seal_chunk(&keys2, &folder2, &hash, &bytes))
    })
    .await
    .map_err(|e| BackupError::Holder(FetchError::Link(e.to_string())))?;
    match sealed {
        None => Ok(Some(path.to_owned())),
        Some(sealed) => {
            let sealed = sealed?;
            holder::put(conn, folder.as_str(), sealed.id.0, &sealed.bytes, false).await?;
            Ok(None)
        }
    }
}
