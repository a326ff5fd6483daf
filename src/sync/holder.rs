//! The backup holder's side of the wire: storing and serving the sealed vaults
//! this device keeps for others (it can read none of them), and the calls the
//! folder's devices make to a holder.
//!
//! Only the device that shared a vault may write to it. Any paired device may
//! read it back: what it gets is sealed, and recovering needs the folder key.

use std::sync::Arc;

use iroh::endpoint::{Connection, RecvStream, SendStream};

use super::Engine;
use super::link::{FetchError, ServeError, reply, request_with};
use crate::device::DeviceId;
use crate::history::store::ChunkStore;
use crate::index::{Index, RecordPage};
use crate::protocol::{
    MAX_FRAME, MAX_INLINE_RECORD, MAX_LARGE_PER_PAGE, MAX_SEALED_CHUNK, MAX_VAULT_IDS,
    ProtocolError, Reply, Request,
};

/// Whether `req` is one a holder serves.
pub fn is_vault_request(req: &Request) -> bool {
    matches!(
        req,
        Request::VaultMissing { .. }
            | Request::VaultPutChunks { .. }
            | Request::VaultPutRecords { .. }
            | Request::VaultPutRecord { .. }
            | Request::VaultList
            | Request::VaultRecords { .. }
            | Request::VaultChunk { .. }
            | Request::VaultRecord { .. }
            | Request::VaultChunkIds { .. }
            | Request::VaultDrop { .. }
    )
}

fn unavailable(reason: impl Into<String>) -> Reply {
    Reply::Unavailable {
        reason: reason.into(),
    }
}

/// Serves one vault request from `peer`; a failure of this device's store is
/// answered as such (the requester says which holder failed).
pub(super) async fn serve(
    engine: &Arc<Engine>,
    peer: DeviceId,
    req: Request,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), ServeError> {
    match answer(engine, peer, req, send, recv).await {
        Err(ServeError::Store(e)) => {
            tracing::warn!(device = %peer, "vault request: {e}");
            let why = format!("the holder's store failed: {e}");
            reply(send, &unavailable(why), None).await
        }
        other => other,
    }
}

async fn answer(
    engine: &Arc<Engine>,
    peer: DeviceId,
    req: Request,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), ServeError> {
    if let Request::VaultList = req {
        let vaults = engine
            .index
            .run(|i| i.vaults())
            .await
            .map_err(|e| ServeError::Store(e.to_string()))?;
        let vaults = vaults.into_iter().map(|v| (v.folder_id, v.label)).collect();
        return reply(send, &Reply::Vaults { vaults }, None).await;
    }
    let folder = match &req {
        Request::VaultMissing { folder, .. }
        | Request::VaultPutChunks { folder, .. }
        | Request::VaultPutRecords { folder, .. }
        | Request::VaultPutRecord { folder, .. }
        | Request::VaultRecords { folder, .. }
        | Request::VaultChunk { folder, .. }
        | Request::VaultRecord { folder, .. }
        | Request::VaultChunkIds { folder, .. }
        | Request::VaultDrop { folder, .. } => folder.clone(),
        _ => return Err(ServeError::Protocol("not a vault request".into())),
    };
    let f = folder.clone();
    let vault = engine
        .index
        .run(move |i| i.vault(&f))
        .await
        .map_err(|e| ServeError::Store(e.to_string()))?;
    let Some((vault, owner)) = vault else {
        return reply(send, &unavailable(format!("no vault {folder} here")), None).await;
    };
    let writes = matches!(
        req,
        Request::VaultMissing { .. }
            | Request::VaultPutChunks { .. }
            | Request::VaultPutRecords { .. }
            | Request::VaultPutRecord { .. }
            | Request::VaultDrop { .. }
    );
    if writes && owner != peer {
        return reply(
            send,
            &unavailable("only the device that shared this vault may write to it"),
            None,
        )
        .await;
    }
    let store_err = |e: crate::index::IndexError| ServeError::Store(e.to_string());
    match req {
        Request::VaultMissing { ids, .. } => {
            let missing = engine
                .index
                .run(move |i| i.vault_missing(vault, &ids))
                .await
                .map_err(store_err)?;
            reply(send, &Reply::VaultMissing { missing }, None).await
        }
        Request::VaultPutChunks { chunks, .. } => {
            let mut entries = Vec::with_capacity(chunks.len());
            for (id, size) in chunks {
                let mut bytes = vec![0u8; size as usize];
                recv.read_exact(&mut bytes)
                    .await
                    .map_err(|e| ServeError::Link(e.to_string()))?;
                entries.push((id, bytes));
            }
            put_chunks_here(engine, vault, entries).await?;
            reply(send, &Reply::VaultStored, None).await
        }
        Request::VaultPutRecord { id, size, .. } => {
            let mut bytes = vec![0u8; size as usize];
            recv.read_exact(&mut bytes)
                .await
                .map_err(|e| ServeError::Link(e.to_string()))?;
            engine
                .index
                .run(move |i| i.vault_put_records(vault, &[(id, bytes)]))
                .await
                .map_err(store_err)?;
            reply(send, &Reply::VaultStored, None).await
        }
        Request::VaultPutRecords { records, .. } => {
            engine
                .index
                .run(move |i| i.vault_put_records(vault, &records))
                .await
                .map_err(store_err)?;
            reply(send, &Reply::VaultStored, None).await
        }
        Request::VaultRecords { after, .. } => {
            let page = RecordPage {
                max_bytes: MAX_FRAME - (64 << 10),
                inline: MAX_INLINE_RECORD,
                max_large: MAX_LARGE_PER_PAGE,
            };
            let (records, large, more) = engine
                .index
                .run(move |i| i.vault_records(vault, after, page))
                .await
                .map_err(store_err)?;
            reply(
                send,
                &Reply::VaultRecords {
                    records,
                    large,
                    more,
                },
                None,
            )
            .await
        }
        Request::VaultChunk { id, .. } | Request::VaultRecord { id, .. } => {
            let bytes = if matches!(req, Request::VaultRecord { .. }) {
                engine
                    .index
                    .run(move |i| i.vault_record(vault, &id))
                    .await
                    .map_err(store_err)?
            } else {
                chunk_here(engine, vault, id).await?
            };
            match bytes {
                Some(b) => {
                    let size = b.len() as u32;
                    reply(send, &Reply::VaultBytes { size }, Some(b)).await
                }
                None => reply(send, &unavailable("not in this vault"), None).await,
            }
        }
        Request::VaultChunkIds { after, .. } => {
            let (ids, more) = engine
                .index
                .run(move |i| i.vault_chunk_ids(vault, after, MAX_VAULT_IDS))
                .await
                .map_err(store_err)?;
            reply(send, &Reply::VaultIds { ids, more }, None).await
        }
        Request::VaultDrop {
            records, chunks, ..
        } => {
            let (r, c) = engine
                .index
                .run(move |i| i.vault_drop(vault, &records, &chunks))
                .await
                .map_err(store_err)?;
            tracing::debug!(device = %peer, vault, records = r, chunks = c, "dropped from a vault");
            reply(send, &Reply::VaultStored, None).await
        }
        _ => Err(ServeError::Protocol("not a vault request".into())),
    }
}

/// Stores sealed chunks in `vault`: their bytes as one new pack of the chunk
/// store (written, fsynced and in place before anything refers to it), then
/// the rows naming them, in one transaction. Done before the put is answered.
async fn put_chunks_here(
    engine: &Arc<Engine>,
    vault: i64,
    entries: Vec<([u8; 32], Vec<u8>)>,
) -> Result<(), ServeError> {
    if entries.is_empty() {
        return Ok(());
    }
    let store = ChunkStore::attach(&crate::history::store_dir(engine.home.root()));
    let (ids, pack) = tokio::task::spawn_blocking(move || {
        let bytes: Vec<&[u8]> = entries.iter().map(|(_, b)| &b[..]).collect();
        let pack = store.write_pack(&bytes);
        let ids: Vec<(i64, [u8; 32])> = entries.iter().map(|(id, _)| (vault, *id)).collect();
        (ids, pack)
    })
    .await
    .map_err(|e| ServeError::Store(e.to_string()))?;
    let pack = pack.map_err(|e| ServeError::Store(e.to_string()))?;
    engine
        .index
        .run(move |i| {
            let r = i.vault_add_pack(&pack.name, pack.size, &pack.entries, &ids, &[]);
            // The store lock goes only once the rows are committed.
            drop(pack);
            r
        })
        .await
        .map_err(|e| ServeError::Store(e.to_string()))
}

/// One sealed chunk of `vault`, read back from the chunk store (checked
/// against the hash it was stored under), or `None` if the vault lacks it.
async fn chunk_here(
    engine: &Arc<Engine>,
    vault: i64,
    id: [u8; 32],
) -> Result<Option<Vec<u8>>, ServeError> {
    let store_err = |e: &dyn std::fmt::Display| ServeError::Store(e.to_string());
    let found = engine
        .index
        .run(move |i| i.vault_chunk(vault, &id))
        .await
        .map_err(|e| store_err(&e))?;
    let Some((hash, loc)) = found else {
        return Ok(None);
    };
    let loc = loc.ok_or_else(|| {
        ServeError::Store(format!(
            "sealed chunk {hash} is missing from the chunk store"
        ))
    })?;
    let store = ChunkStore::attach(&crate::history::store_dir(engine.home.root()));
    tokio::task::spawn_blocking(move || store.reader()?.read_at(&hash, &loc))
        .await
        .map_err(|e| store_err(&e))?
        .map(Some)
        .map_err(|e| store_err(&e))
}

/// Moves sealed chunks that an index from before schema 12 holds as blobs
/// into the chunk store, a pack at a time (each pack's rows and the removal
/// of the blobs it took in one transaction, so a crash at any moment leaves
/// every chunk in exactly one place). Returns how many moved.
pub fn move_legacy_chunks(
    index: &mut Index,
    store: &ChunkStore,
) -> Result<u64, crate::history::store::StoreError> {
    let mut moved = 0;
    loop {
        let batch = index.vault_legacy_chunks(256)?;
        if batch.is_empty() {
            return Ok(moved);
        }
        let bytes: Vec<&[u8]> = batch.iter().map(|c| &c.bytes[..]).collect();
        let pack = store.write_pack(&bytes)?;
        let owners: Vec<(i64, [u8; 32])> = batch.iter().map(|c| (c.vault, c.id)).collect();
        let rows: Vec<i64> = batch.iter().map(|c| c.row).collect();
        index.vault_add_pack(&pack.name, pack.size, &pack.entries, &owners, &rows)?;
        moved += batch.len() as u64;
    }
}

fn unexpected(r: Reply) -> FetchError {
    match r {
        Reply::Unavailable { reason } => FetchError::Unavailable(reason),
        other => FetchError::Protocol(ProtocolError::Malformed(format!(
            "unexpected reply {other:?}"
        ))),
    }
}

/// Asks a holder which of `ids` it lacks (any number of ids).
pub async fn missing(
    conn: &Connection,
    folder: &str,
    ids: &[[u8; 32]],
) -> Result<Vec<usize>, FetchError> {
    let mut out = Vec::new();
    for (n, part) in ids.chunks(MAX_VAULT_IDS).enumerate() {
        let req = Request::VaultMissing {
            folder: folder.to_owned(),
            ids: part.to_vec(),
        };
        match request_with(conn, &req, None).await?.0 {
            Reply::VaultMissing { missing } => {
                for i in missing {
                    if i as usize >= part.len() {
                        return Err(FetchError::Protocol(ProtocolError::Malformed(
                            "a missing index out of range".into(),
                        )));
                    }
                    out.push(n * MAX_VAULT_IDS + i as usize);
                }
            }
            other => return Err(unexpected(other)),
        }
    }
    Ok(out)
}

/// Sends sealed chunks in one request (within
/// [`crate::protocol::MAX_PUT_CHUNKS`] and [`crate::protocol::MAX_PUT_BYTES`]).
pub async fn put_chunks(
    conn: &Connection,
    folder: &str,
    chunks: &[([u8; 32], Vec<u8>)],
) -> Result<(), FetchError> {
    let req = Request::VaultPutChunks {
        folder: folder.to_owned(),
        chunks: chunks.iter().map(|(id, b)| (*id, b.len() as u32)).collect(),
    };
    let mut body = Vec::with_capacity(chunks.iter().map(|(_, b)| b.len()).sum());
    for (_, b) in chunks {
        body.extend_from_slice(b);
    }
    match request_with(conn, &req, Some(&body)).await?.0 {
        Reply::VaultStored => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// Sends a sealed record too large to go inline.
pub async fn put_record(
    conn: &Connection,
    folder: &str,
    id: [u8; 32],
    bytes: &[u8],
) -> Result<(), FetchError> {
    let size = bytes.len() as u32;
    let req = Request::VaultPutRecord {
        folder: folder.to_owned(),
        id,
        size,
    };
    match request_with(conn, &req, Some(bytes)).await?.0 {
        Reply::VaultStored => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// Sends sealed records small enough to go inline, as few requests as fit.
pub async fn put_records(
    conn: &Connection,
    folder: &str,
    records: Vec<([u8; 32], Vec<u8>)>,
) -> Result<(), FetchError> {
    let budget = MAX_FRAME - (64 << 10);
    let mut batch: Vec<([u8; 32], Vec<u8>)> = Vec::new();
    let mut size = 0;
    let mut it = records.into_iter().peekable();
    while let Some(r) = it.next() {
        size += r.1.len() + 48;
        batch.push(r);
        let next_fits = it.peek().is_some_and(|n| size + n.1.len() + 48 <= budget);
        if !next_fits {
            let req = Request::VaultPutRecords {
                folder: folder.to_owned(),
                records: std::mem::take(&mut batch),
            };
            match request_with(conn, &req, None).await?.0 {
                Reply::VaultStored => {}
                other => return Err(unexpected(other)),
            }
            size = 0;
        }
    }
    Ok(())
}

/// The vaults a holder keeps: (folder id, label).
pub async fn list(conn: &Connection) -> Result<Vec<(String, String)>, FetchError> {
    match request_with(conn, &Request::VaultList, None).await?.0 {
        Reply::Vaults { vaults } => Ok(vaults),
        other => Err(unexpected(other)),
    }
}

/// Every sealed record of a vault: (id, bytes); `None`, after one page, if
/// `wanted` turns down its first record (a vault another key sealed).
pub async fn records(
    conn: &Connection,
    folder: &str,
    wanted: impl Fn(&[u8; 32], &[u8]) -> bool,
) -> Result<Option<Vec<([u8; 32], Vec<u8>)>>, FetchError> {
    let mut out: Vec<([u8; 32], Vec<u8>)> = Vec::new();
    let mut after = None;
    loop {
        let req = Request::VaultRecords {
            folder: folder.to_owned(),
            after,
        };
        let (records, large, more) = match request_with(conn, &req, None).await?.0 {
            Reply::VaultRecords {
                records,
                large,
                more,
            } => (records, large, more),
            other => return Err(unexpected(other)),
        };
        let last = records
            .iter()
            .map(|(id, _)| *id)
            .chain(large.iter().copied())
            .max();
        if last.is_some_and(|l| after.is_some_and(|a| l <= a)) {
            return Err(FetchError::Protocol(ProtocolError::Malformed(
                "a page of records that does not move forward".into(),
            )));
        }
        let first_page = out.is_empty();
        out.extend(records);
        for id in large {
            let bytes = get(conn, folder, id, true).await?;
            out.push((id, bytes));
        }
        if first_page && out.first().is_some_and(|(id, b)| !wanted(id, b)) {
            return Ok(None);
        }
        if !more {
            return Ok(Some(out));
        }
        match last {
            Some(l) => after = Some(l),
            None => {
                return Err(FetchError::Protocol(ProtocolError::Malformed(
                    "an empty page with more to follow".into(),
                )));
            }
        }
    }
}

/// One sealed chunk or record.
pub async fn get(
    conn: &Connection,
    folder: &str,
    id: [u8; 32],
    record: bool,
) -> Result<Vec<u8>, FetchError> {
    let folder = folder.to_owned();
    let req = if record {
        Request::VaultRecord { folder, id }
    } else {
        Request::VaultChunk { folder, id }
    };
    let (reply, mut recv) = request_with(conn, &req, None).await?;
    match reply {
        Reply::VaultBytes { size } if !record && size > MAX_SEALED_CHUNK => {
            Err(FetchError::Protocol(ProtocolError::Malformed(format!(
                "a sealed chunk of {size} bytes"
            ))))
        }
        Reply::VaultBytes { size } => {
            let mut buf = vec![0u8; size as usize];
            recv.read_exact(&mut buf)
                .await
                .map_err(|e| FetchError::Link(e.to_string()))?;
            Ok(buf)
        }
        other => Err(unexpected(other)),
    }
}

/// Every sealed chunk id a holder keeps of a vault.
pub async fn chunk_ids(conn: &Connection, folder: &str) -> Result<Vec<[u8; 32]>, FetchError> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let req = Request::VaultChunkIds {
            folder: folder.to_owned(),
            after,
        };
        let (ids, more) = match request_with(conn, &req, None).await?.0 {
            Reply::VaultIds { ids, more } => (ids, more),
            other => return Err(unexpected(other)),
        };
        let moves_on = ids.windows(2).all(|w| w[0] < w[1])
            && match (ids.first(), after) {
                (Some(first), Some(a)) => *first > a,
                (None, _) => !more,
                _ => true,
            };
        if !moves_on {
            return Err(FetchError::Protocol(ProtocolError::Malformed(
                "a page of ids that does not move forward".into(),
            )));
        }
        after = ids.last().copied();
        out.extend(ids);
        if !more {
            return Ok(out);
        }
    }
}

/// Drops sealed records and chunks from a vault (any number of each).
pub async fn drop_sealed(
    conn: &Connection,
    folder: &str,
    records: &[[u8; 32]],
    chunks: &[[u8; 32]],
) -> Result<(), FetchError> {
    let pages = records.len().max(chunks.len()).div_ceil(MAX_VAULT_IDS);
    for n in 0..pages {
        let page = |ids: &[[u8; 32]]| -> Vec<[u8; 32]> {
            ids.iter()
                .skip(n * MAX_VAULT_IDS)
                .take(MAX_VAULT_IDS)
                .copied()
                .collect()
        };
        let req = Request::VaultDrop {
            folder: folder.to_owned(),
            records: page(records),
            chunks: page(chunks),
        };
        match request_with(conn, &req, None).await?.0 {
            Reply::VaultStored => {}
            other => return Err(unexpected(other)),
        }
    }
    Ok(())
}
