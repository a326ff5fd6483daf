//! Sending folders, sealed, to the devices that hold them encrypted: for each
//! holder, every record changed since it was last sent and every version the
//! history kept since (their chunks first, only the ones it lacks), in the
//! background as changes commit.
//!
//! Records are sealed with a revision that grows with every record sent to that
//! holder, so a reader can refuse an older one it is served in place of a newer
//! one it has seen (see `vault`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iroh::endpoint::Connection;

use super::Engine;
use super::holder;
use super::link::{FetchError, history_chunk, read_verified};
use crate::chunking::{ChunkHash, ChunkInfo};
use crate::device::DeviceId;
use crate::folder::FolderId;
use crate::index::{Folder, HistoryVersion, IndexError, LocalFile};
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

/// How often a holder's chunks are collected when nothing was pruned.
const COLLECT_EVERY: Duration = Duration::from_secs(3600);

/// Records read per round.
const BATCH: usize = 512;

/// Keeps `peer` sent every folder it holds for this device while the link
/// lasts: after each local change, when the peer's list of held folders
/// changes, and every minute as a backstop.
pub async fn run(engine: Arc<Engine>, conn: Connection, peer: DeviceId) {
    let mut changes = engine.local_changes.subscribe();
    let mut vaults = engine.peer_vaults.subscribe();
    let mut collected: HashMap<FolderId, Instant> = HashMap::new();
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
                Err(e) => {
                    tracing::warn!(device = %peer, folder = %folder.id, "backup holder: {e}");
                    continue;
                }
            }
            // Collecting asks the holder for its whole chunk list: at most
            // once an hour per folder and link, and whenever versions went.
            let due = collected
                .get(&folder.id)
                .is_none_or(|t: &Instant| t.elapsed() >= COLLECT_EVERY);
            let row = folder.row;
            let pruned = engine
                .index
                .run(move |i| i.pruned_sent_versions(row, &peer, 1))
                .await
                .map(|p| !p.is_empty())
                .unwrap_or(false);
            if due || pruned {
                match collect(&engine, &conn, peer, &folder).await {
                    Ok((0, 0)) => {}
                    Ok((records, chunks)) => {
                        tracing::info!(device = %peer, folder = %folder.id, records, chunks, "dropped what the history no longer keeps from the backup holder")
                    }
                    Err(e) => {
                        tracing::warn!(device = %peer, folder = %folder.id, "backup holder: {e}");
                        continue;
                    }
                }
                collected.insert(folder.id.clone(), Instant::now());
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
    let (mut state, keys) = engine
        .index
        .run(move |i| -> Result<_, IndexError> {
            let state = i.holder_state(row, &peer)?.unwrap_or_default();
            Ok((state, i.folder_secret(row)?.keys()))
        })
        .await?;
    let keys = Arc::new(keys);
    let mut sent = 0;
    // The current records first.
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
            break;
        };
        let mut wanted = Vec::new();
        for (f, chunks) in &batch {
            let path = f.record.path.as_str();
            wanted.extend(chunks.iter().map(|c| (*c, Place::Live(path.to_owned()))));
        }
        let unsent = send_chunks(engine, conn, folder, &keys, wanted).await?;
        let mut records = Vec::new();
        for (f, chunks) in &batch {
            if unsent.contains(f.record.path.as_str()) {
                // Its file changed under us: the scan brings a newer record.
                continue;
            }
            state.revision += 1;
            records.push(vault_record(f, chunks, state.revision));
        }
        sent += send_records(conn, folder, &keys, &records).await?.len();
        state.pushed = last as i64;
        let s = state;
        engine
            .index
            .run(move |i| i.set_holder_state(row, &peer, s))
            .await?;
    }
    // Then the versions the history kept, so the folder can be recovered as
    // it was at an earlier time.
    loop {
        let after = state.history;
        let batch = engine
            .index
            .run(
                move |i| -> Result<Vec<(HistoryVersion, Vec<ChunkInfo>)>, IndexError> {
                    i.history_after(row, after, BATCH)?
                        .into_iter()
                        .map(|v| {
                            let chunks = i.history_chunks(v.id)?;
                            Ok((v, chunks))
                        })
                        .collect()
                },
            )
            .await?;
        let Some(last) = batch.iter().map(|(v, _)| v.id).max() else {
            return Ok(sent);
        };
        let wanted: Vec<(ChunkInfo, Place)> = batch
            .iter()
            .flat_map(|(_, chunks)| chunks.iter().map(|c| (*c, Place::History)))
            .collect();
        let unsent = send_chunks(engine, conn, folder, &keys, wanted).await?;
        let mut records = Vec::new();
        let mut versions = Vec::new();
        for (v, chunks) in &batch {
            if chunks.iter().any(|c| unsent.contains(&c.hash.to_hex())) {
                // Pruned meanwhile, or its bytes are damaged: nothing to keep.
                continue;
            }
            state.revision += 1;
            records.push(history_record(v, chunks, state.revision));
            versions.push(v.id);
        }
        let ids = send_records(conn, folder, &keys, &records).await?;
        sent += ids.len();
        let went: Vec<(i64, [u8; 32])> = versions.into_iter().zip(ids).collect();
        state.history = last;
        let s = state;
        engine
            .index
            .run(move |i| {
                i.note_sent_versions(row, &peer, &went)?;
                i.set_holder_state(row, &peer, s)
            })
            .await?;
    }
}

/// Versions dropped from a holder per round.
const DROP_BATCH: usize = 4096;

/// Mirrors this device's retention on a holder that is up to date: drops
/// the records of the versions the history here no longer keeps, then every
/// sealed chunk that neither a live file nor a kept version refers to.
/// Returns (records, chunks) dropped; does nothing while changes are still
/// to be sent (the holder's records then still name chunks the index here
/// has moved on from).
pub async fn collect(
    engine: &Arc<Engine>,
    conn: &Connection,
    peer: DeviceId,
    folder: &Folder,
) -> Result<(usize, usize), BackupError> {
    let row = folder.row;
    let mut records = 0;
    loop {
        let pruned = engine
            .index
            .run(move |i| i.pruned_sent_versions(row, &peer, DROP_BATCH))
            .await?;
        if pruned.is_empty() {
            break;
        }
        let ids: Vec<[u8; 32]> = pruned.iter().map(|(_, id)| *id).collect();
        holder::drop_sealed(conn, folder.id.as_str(), &ids, &[]).await?;
        records += ids.len();
        let versions: Vec<i64> = pruned.iter().map(|(v, _)| *v).collect();
        engine
            .index
            .run(move |i| i.forget_sent_versions(row, &peer, &versions))
            .await?;
    }
    // What the holder must keep, read in one go with the check that it has
    // been sent everything.
    let keys = engine
        .index
        .run(move |i| -> Result<_, IndexError> {
            let state = i.holder_state(row, &peer)?.unwrap_or_default();
            let behind = !i.local_since(row, state.pushed as u64, 1)?.is_empty()
                || !i.history_after(row, state.history, 1)?.is_empty();
            if behind {
                return Ok(None);
            }
            let keys = i.folder_secret(row)?.keys();
            let live: HashSet<[u8; 32]> = i
                .live_chunk_hashes(row)?
                .into_iter()
                .map(|h| keys.chunk_id(&ChunkHash(h)).0)
                .collect();
            Ok(Some(live))
        })
        .await?;
    let Some(live) = keys else {
        return Ok((records, 0));
    };
    let held = holder::chunk_ids(conn, folder.id.as_str()).await?;
    let unused: Vec<[u8; 32]> = held.into_iter().filter(|id| !live.contains(id)).collect();
    if !unused.is_empty() {
        holder::drop_sealed(conn, folder.id.as_str(), &[], &unused).await?;
    }
    Ok((records, unused.len()))
}

/// Seals and sends records, small ones batched; returns their ids, in order.
async fn send_records(
    conn: &Connection,
    folder: &Folder,
    keys: &VaultKeys,
    records: &[VaultRecord],
) -> Result<Vec<[u8; 32]>, BackupError> {
    let mut inline = Vec::new();
    let mut ids = Vec::with_capacity(records.len());
    for rec in records {
        let sealed = seal_record(keys, &folder.id, rec)?;
        ids.push(sealed.id.0);
        if sealed.bytes.len() <= MAX_INLINE_RECORD {
            inline.push((sealed.id.0, sealed.bytes));
        } else {
            holder::put_record(conn, folder.id.as_str(), sealed.id.0, &sealed.bytes).await?;
        }
    }
    holder::put_records(conn, folder.id.as_str(), inline).await?;
    Ok(ids)
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

/// The record a holder keeps for a version in the history.
fn history_record(v: &HistoryVersion, chunks: &[ChunkInfo], revision: u64) -> VaultRecord {
    VaultRecord {
        path: v.path.clone(),
        kind: v.kind.into(),
        size: v.size,
        mtime_ns: v.mtime_ns,
        permissions: v.permissions,
        hash: v.hash,
        symlink_target: v.symlink_target.clone(),
        deleted: false,
        version: v.version.clone(),
        modified_by: v.modified_by,
        chunks: chunks.iter().map(|c| (c.hash, c.len)).collect(),
        revision,
        superseded_at_ns: Some(v.superseded_at.saturating_mul(1_000_000_000)),
    }
}

/// Where a chunk to send is read.
#[derive(Debug, Clone)]
enum Place {
    /// In the live file at this path.
    Live(String),
    /// In the history (its store, or a version still pending there).
    History,
}

/// Sends the holder the chunks it lacks among `wanted`, sealed, in groups
/// (one request and one holder transaction each), a few groups at once.
/// Returns what could not be read as indexed: the paths of live files
/// (changed since) and the hex hashes of history chunks (pruned or damaged).
async fn send_chunks(
    engine: &Arc<Engine>,
    conn: &Connection,
    folder: &Folder,
    keys: &Arc<VaultKeys>,
    wanted: Vec<(ChunkInfo, Place)>,
) -> Result<HashSet<String>, BackupError> {
    // Each distinct chunk once, with where to read it.
    let mut once: HashMap<ChunkHash, (Place, ChunkInfo)> = HashMap::new();
    for (c, place) in wanted {
        once.entry(c.hash).or_insert((place, c));
    }
    let list: Vec<(ChunkHash, (Place, ChunkInfo))> = once.into_iter().collect();
    let ids: Vec<[u8; 32]> = list.iter().map(|(h, _)| keys.chunk_id(h).0).collect();
    let missing = holder::missing(conn, folder.id.as_str(), &ids).await?;
    let mut unreadable = HashSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut group = Vec::new();
    let mut bytes = 0usize;
    let mut it = missing.into_iter().peekable();
    while let Some(i) = it.next() {
        bytes += list[i].1.1.len as usize;
        group.push(list[i].clone());
        let full = group.len() >= GROUP_CHUNKS || bytes >= GROUP_BYTES;
        if !full && it.peek().is_some() {
            continue;
        }
        if tasks.len() >= GROUPS_IN_FLIGHT
            && let Some(r) = tasks.join_next().await
        {
            settle(r, &mut unreadable)?;
        }
        let batch = std::mem::take(&mut group);
        bytes = 0;
        let (engine, conn, keys, folder) =
            (engine.clone(), conn.clone(), keys.clone(), folder.clone());
        tasks.spawn(async move { send_group(&engine, &conn, &keys, &folder, batch).await });
    }
    while let Some(r) = tasks.join_next().await {
        settle(r, &mut unreadable)?;
    }
    Ok(unreadable)
}

/// Chunks per put request, and about how many plaintext bytes.
const GROUP_CHUNKS: usize = 64;
const GROUP_BYTES: usize = 2 << 20;
/// Put requests in flight to a holder at once.
const GROUPS_IN_FLIGHT: usize = 4;

type Sent = Result<Vec<String>, BackupError>;

fn settle(
    r: Result<Sent, tokio::task::JoinError>,
    unreadable: &mut HashSet<String>,
) -> Result<(), BackupError> {
    match r {
        Ok(Ok(missed)) => {
            unreadable.extend(missed);
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(e) => Err(BackupError::Holder(FetchError::Link(e.to_string()))),
    }
}

/// Reads, seals and sends a group of chunks; returns what [`send_chunks`]
/// reports for those that cannot be read as indexed.
async fn send_group(
    engine: &Arc<Engine>,
    conn: &Connection,
    keys: &VaultKeys,
    folder: &Folder,
    group: Vec<(ChunkHash, (Place, ChunkInfo))>,
) -> Sent {
    let joined = |e: tokio::task::JoinError| BackupError::Holder(FetchError::Link(e.to_string()));
    // History chunks are read here; live ones with the sealing, below.
    let mut history = HashMap::new();
    for (hash, (place, c)) in &group {
        if let Place::History = place
            && let Some(b) =
                history_chunk(engine, folder.row, folder.path.clone(), *hash, c.len).await
        {
            history.insert(*hash, b);
        }
    }
    let (keys, fid, root) = (keys.clone(), folder.id.clone(), folder.path.clone());
    let (sealed, missed) = tokio::task::spawn_blocking(move || -> Result<_, BackupError> {
        let mut sealed = Vec::with_capacity(group.len());
        let mut missed = Vec::new();
        for (hash, (place, c)) in group {
            let bytes = match &place {
                Place::Live(path) => read_verified(&root.join(path), c.offset, c.len, &hash),
                Place::History => history.remove(&hash),
            };
            match bytes {
                Some(b) => {
                    let s = seal_chunk(&keys, &fid, &hash, &b)?;
                    sealed.push((s.id.0, s.bytes));
                }
                None => missed.push(match place {
                    Place::Live(path) => path,
                    Place::History => hash.to_hex(),
                }),
            }
        }
        Ok((sealed, missed))
    })
    .await
    .map_err(joined)??;
    if !sealed.is_empty() {
        holder::put_chunks(conn, folder.id.as_str(), &sealed).await?;
    }
    Ok(missed)
}
